import warnings, torch; warnings.simplefilter("ignore")
from transformers import LlamaConfig, Qwen2Config, Starcoder2Config, AutoModelForCausalLM
shapes = {
 "deepseek-coder-1.3b (llama)": (LlamaConfig, dict(vocab_size=32256, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=16384, rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0}, bos_token_id=32013, eos_token_id=32014)),
 "codellama-7b (llama)": (LlamaConfig, dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384, rope_theta=1e6, rms_norm_eps=1e-5)),
 "qwen2.5-coder-0.5b": (Qwen2Config, dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6)),
 "qwen2.5-coder-1.5b": (Qwen2Config, dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6)),
 "qwen2.5-coder-7b": (Qwen2Config, dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, max_position_embeddings=32768, rope_theta=1e6)),
 "starcoder2-3b": (Starcoder2Config, dict(vocab_size=49152, hidden_size=3072, intermediate_size=12288, num_hidden_layers=30, num_attention_heads=24, num_key_value_heads=2, max_position_embeddings=16384, sliding_window=4096, rope_theta=999999.4420358813, bos_token_id=0, eos_token_id=0)),
}
for name, (cls, kw) in shapes.items():
    c = cls(**kw)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(c)
    n = sum(p.numel() for p in m.parameters())
    print(f"{name:30s} {n:,} params (tied={c.tie_word_embeddings}); KV per token per layer = 2*{c.num_key_value_heads}*{getattr(c,'head_dim',None) or c.hidden_size//c.num_attention_heads}")
