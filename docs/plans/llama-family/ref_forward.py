"""Independent pure-torch forward of llama / qwen2 / starcoder2 from config.json + state dict,
compared with HF logits (sdpa and eager), incl. sliding windows, rope variants, tied heads."""
import json, math, sys, torch
torch.set_num_threads(1)
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file

def inv_freq_of(c):
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
    typ = rp.get("rope_type", rp.get("type", "default"))
    D = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    att = 1.0
    if typ == "linear":
        inv = inv / rp["factor"]
    elif typ == "llama3":
        f, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], rp["original_max_position_embeddings"]
        wl = 2 * math.pi / inv
        x = torch.where(wl > old / lo, inv / f, inv)
        s = (old / wl - lo) / (hi - lo)
        sm = (1 - s) * x / f + s * x
        med = ~(wl < old / hi) * ~(wl > old / lo)
        inv = torch.where(med, sm, x)
    elif typ == "yarn":
        f = rp["factor"]; old = rp["original_max_position_embeddings"]
        att = rp.get("attention_factor") or (1.0 if f <= 1 else 0.1 * math.log(f) + 1.0)
        bf, bs = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1
        cd = lambda r: (D * math.log(old / (r * 2 * math.pi))) / (2 * math.log(theta))
        lo, hi = math.floor(cd(bf)), math.ceil(cd(bs))
        lo, hi = max(lo, 0), min(hi, D - 1)
        if lo == hi: hi += 0.001
        ramp = ((torch.arange(D // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        pos = theta ** (torch.arange(0, D, 2).float() / D)
        ext = 1 - ramp
        inv = (1.0 / (f * pos)) * (1 - ext) + (1.0 / pos) * ext
    elif typ == "dynamic":
        pass  # = default for seq_len <= max_position_embeddings (HF only recomputes beyond it)
    elif typ != "default":
        raise ValueError(typ)
    return inv, att

def forward(c, sd, ids):
    mt = c["model_type"]; E = c["hidden_size"]; H = c["num_attention_heads"]; KV = c.get("num_key_value_heads") or H
    D = c.get("head_dim") or E // H; L = c["num_hidden_layers"]
    g = lambda n: sd.get(n)
    B, T = ids.shape
    inv, att = inv_freq_of(c)
    pos = torch.arange(T).float()
    fr = pos[:, None] * inv[None]; emb = torch.cat([fr, fr], -1)
    cos, sin = emb.cos() * att, emb.sin() * att
    rot = lambda x: torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    if mt == "starcoder2":
        norm = lambda x, p: F.layer_norm(x, (E,), g(p + ".weight"), g(p + ".bias"), c.get("norm_epsilon", 1e-5))
    else:
        eps = c.get("rms_norm_eps", 1e-6)
        norm = lambda x, p: g(p + ".weight") * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    lin = lambda x, p: F.linear(x, g(p + ".weight"), g(p + ".bias"))
    h = g("model.embed_tokens.weight")[ids]
    q_i = torch.arange(T)[:, None]; k_i = torch.arange(T)[None]
    for l in range(L):
        p = f"model.layers.{l}"
        if mt == "qwen2":
            lt = (c.get("layer_types") or [])[l] if c.get("layer_types") else ("sliding_attention" if c.get("use_sliding_window") and l >= c["max_window_layers"] else "full_attention")
            W = c.get("sliding_window") if (lt == "sliding_attention" and c.get("use_sliding_window")) else None
        elif mt == "starcoder2":
            W = c.get("sliding_window")
        else:
            W = None
        allowed = k_i <= q_i
        if W is not None:
            allowed = allowed & (k_i > q_i - W)   # sees W keys including itself
        x = norm(h, p + ".input_layernorm")
        q = lin(x, p + ".self_attn.q_proj").view(B, T, H, D).transpose(1, 2)
        k = lin(x, p + ".self_attn.k_proj").view(B, T, KV, D).transpose(1, 2)
        v = lin(x, p + ".self_attn.v_proj").view(B, T, KV, D).transpose(1, 2)
        q = q * cos + rot(q) * sin; k = k * cos + rot(k) * sin
        k = k.repeat_interleave(H // KV, dim=1); v = v.repeat_interleave(H // KV, dim=1)
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        a = (s @ v).transpose(1, 2).reshape(B, T, H * D)
        h = h + lin(a, p + ".self_attn.o_proj")
        x = norm(h, p + ".post_attention_layernorm")
        if mt == "starcoder2":
            m = lin(F.gelu(lin(x, p + ".mlp.c_fc"), approximate="tanh"), p + ".mlp.c_proj")
        else:
            m = lin(F.silu(lin(x, p + ".mlp.gate_proj")) * lin(x, p + ".mlp.up_proj"), p + ".mlp.down_proj")
        h = h + m
    h = norm(h, "model.norm")
    head = g("lm_head.weight") if "lm_head.weight" in sd else g("model.embed_tokens.weight")
    return h @ head.T

if __name__ == "__main__":
    root = "/tmp/issue25/cfgs"
    import os
    torch.manual_seed(1)
    for name in sorted(os.listdir(root)):
        d = f"{root}/{name}"
        c = json.load(open(f"{d}/config.json"))
        ids = torch.randint(0, c["vocab_size"], (2, 20))  # T=20 > sliding_window 5
        res = []
        for impl in ["sdpa", "eager"]:
            m = AutoModelForCausalLM.from_pretrained(d, attn_implementation=impl).float().eval()
            torch.manual_seed(7)
            with torch.no_grad():
                for n, p in m.named_parameters():   # random norms and biases, larger weights
                    p.add_(torch.randn_like(p) * (0.1 if ("norm" in n or n.endswith("bias")) else 0.05))
                ref = m(ids).logits
            sd = {k: v for k, v in m.state_dict().items()}
            if m.config.tie_word_embeddings: sd.pop("lm_head.weight", None)
            ours = forward(c, sd, ids)
            res.append(f"{impl}: {((ours - ref).abs().max() / ref.abs().max()).item():.2e}")
        # same without the sliding window: does the window matter here?
        # does the window matter? compare to HF with the window removed
        print(f"{name:28s} default_impl={AutoModelForCausalLM.from_pretrained(d).config._attn_implementation} " + "  ".join(res))
