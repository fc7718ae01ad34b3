"""Serving on CPU: `worker serve` vs HF transformers `generate`, in the same run, same threads.

A model shape with random weights, fp32: codegen-350M, or with SHAPE=qwen2.5-coder-0.5b the Qwen2.5-Coder
0.5B shape (grouped-query attention with 2 KV heads, a tied head). A request like the FauxPilot
extension's: a prompt of PROMPT tokens, NEW new tokens, greedy. The tokenizer is a word-level stand-in
whose every id decodes to text, so each new token is one streamed event.

    SHAPE=codegen-350M .venv/bin/python bench/serve.py WORKDIR [THREADS]

Prints markdown tables: one client (time to first token, decode tokens/s p50/p95, next to the
floor the weight bytes and the measured memory bandwidth set), then 1/4/8 concurrent clients
(aggregate decode tokens/s while all of them decode, and end to end), medians of 3 interleaved rounds,
then an editor's next request (the last prompt and EDIT more tokens): its time to first token with
the server's prefix cache, without it, and HF's whole prefill, medians of 3.
"""

import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import os

import torch
from transformers import AutoModelForCausalLM, CodeGenConfig, CodeGenForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.generation.streamers import BaseStreamer

ROOT = Path(__file__).resolve().parent.parent
SHAPE = os.environ.get("SHAPE", "codegen-350M")
# name -> (HF class, its config)
SHAPES = {
    "codegen-350M": (CodeGenForCausalLM, lambda: CodeGenConfig(
        vocab_size=51200, n_positions=2048, n_ctx=2048, n_embd=1024, n_layer=20, n_head=16, rotary_dim=32,
        bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False)),
    "qwen2.5-coder-0.5b": (Qwen2ForCausalLM, lambda: Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)),
}
MODEL_CLASS, MAKE_CONFIG = SHAPES[SHAPE]
VOCAB, EOS = MAKE_CONFIG().vocab_size, MAKE_CONFIG().eos_token_id
PROMPT, NEW, EDIT = 500, 64, 16
CLIENTS, ROUNDS = (1, 4, 8), 3


def make_model(work: Path) -> Path:
    out = work / f"{SHAPE}-random"
    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(0)
    model = MODEL_CLASS(MAKE_CONFIG()).float().eval()
    model.save_pretrained(out, safe_serialization=True)
    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["<|endoftext|>"] = EOS
    del vocab[f"w{EOS}"]
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
                 "added_tokens": [{"id": EOS, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True}],
                 "pre_tokenizer": {"type": "Whitespace"}, "decoder": None,
                 "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}}
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out


def prompt_ids(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, EOS, (PROMPT,), generator=g).tolist()


def bandwidth_gbs(threads: int) -> float:
    """STREAM triad a = b + s c over 3 x 512 MB, best of 5, in torch on `threads` threads."""
    torch.set_num_threads(threads)
    n = 128 << 20
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t)
    return 3 * n * 4 / best / 1e9


class Clock(BaseStreamer):
    """Records when HF generate hands out each token (the prompt first)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf_generate(model_dir: Path, threads: int, runs: int = 2):
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    for run in range(runs):
        ids = torch.tensor([prompt_ids(run)])
        clock = Clock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                           pad_token_id=EOS, streamer=clock)
        times = clock.times[1:]  # the first put is the prompt
        results.append((times[0] - start, [b - a for a, b in zip(times, times[1:])], len(times)))
    del model
    return results


class Server:
    def __init__(self, model_dir: Path, threads: int, max_batch: int, extra=()):
        self.proc = subprocess.Popen([str(ROOT / "target/debug/worker"), "serve", "--model", str(model_dir), "--port", "0",
                                      "--device", "cpu", "--threads", str(threads), "--max_batch", str(max_batch), *extra],
                                     stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            if " at http://" in line:
                self.host, port = line.split(" at http://")[1].split("/")[0].split(":")
                self.port = int(port)
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def stream(self, ids, new=NEW):
        """One streamed completion: (send time, arrival time of each token event)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        body = json.dumps({"prompt": ids, "max_tokens": new, "temperature": 0, "stream": True})
        start = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        times = []
        for line in response:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.perf_counter())
        conn.close()
        return start, times

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main(work: Path, threads: int):
    work.mkdir(parents=True, exist_ok=True)
    model_dir = make_model(work)
    config = MAKE_CONFIG()
    with torch.device("meta"):
        n_params = sum(p.numel() for p in MODEL_CLASS(config).parameters())
    # A decode step reads every weight matrix once; of the embedding table only one row, unless
    # it is also the head (tied), which reads all of it.
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    read_bytes = (n_params - (0 if config.tie_word_embeddings else VOCAB * hidden)) * 4
    gbs = bandwidth_gbs(threads)
    floor_ms = read_bytes / (gbs * 1e9) * 1e3

    hf = hf_generate(model_dir, threads)
    server = Server(model_dir, threads, max_batch=8)
    ours = [server.stream(prompt_ids(run)) for run in range(3)][1:]  # the first warms up
    ours = [(times[0] - start, [b - a for a, b in zip(times, times[1:])], len(times)) for start, times in ours]

    def row(name, runs):
        ttft = statistics.median(r[0] for r in runs)
        steps = [s for r in runs for s in r[1]]
        p50, p95 = percentile(steps, 50), percentile(steps, 95)
        return f"| {name} | {ttft:.2f} | {1 / p50:.2f} | {1 / p95:.2f} | {p50 * 1e3:.1f} | {p50 * 1e3 / floor_ms:.2f}x | {runs[0][2]} |", ttft, p50

    print(f"\n{SHAPE} shape, random weights, fp32, CPU, {threads} threads; prompt {PROMPT} tokens, {NEW} new, greedy.")
    print(f"Memory bandwidth (triad, same run): {gbs:.1f} GB/s; weights read per decode step {read_bytes / 1e9:.2f} GB "
          f"-> floor {floor_ms:.1f} ms/token ({1e3 / floor_ms:.1f} tokens/s).\n")
    print("| one client | time to first token s | decode tokens/s p50 | decode tokens/s p95 | ms/token p50 | vs floor | tokens |")
    print("|---|---|---|---|---|---|---|")
    hf_row, hf_ttft, hf_p50 = row("HF transformers generate (KV cache)", hf)
    ours_row, ours_ttft, ours_p50 = row("worker serve (streamed over HTTP)", ours)
    print(hf_row)
    print(ours_row)
    print(f"\nworker serve vs HF: time to first token {hf_ttft / ours_ttft:.2f}x faster, decode {hf_p50 / ours_p50:.2f}x faster.\n")

    # Rounds of 1, 4 and 8 clients, interleaved, so that a slow minute on a shared machine does not
    # land on one client count only; each count's median over the rounds.
    # Every request has a prompt of its own, so the prefix cache holds none of them.
    decode, end_to_end, tokens = {}, {}, {}
    for round_ in range(ROUNDS):
        for clients in CLIENTS:
            results = [None] * clients

            def client(i):
                results[i] = server.stream(prompt_ids(1000 * (round_ + 1) + 100 * clients + i))

            threads_ = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
            t0 = time.perf_counter()
            for t in threads_:
                t.start()
            for t in threads_:
                t.join()
            wall = time.perf_counter() - t0
            # The window in which every client is decoding: after the last first token, before the first last one.
            lo, hi = max(r[1][0] for r in results), min(r[1][-1] for r in results)
            in_window = sum(sum(lo < t <= hi for t in r[1]) for r in results)
            decode.setdefault(clients, []).append(in_window / (hi - lo) if hi > lo else float("nan"))
            total = sum(len(r[1]) for r in results)
            end_to_end.setdefault(clients, []).append(total / wall)
            tokens[clients] = total

    print(f"| concurrent clients | aggregate decode tokens/s (all decoding), median of {ROUNDS} rounds | vs 1 client | each round vs its 1 client | end-to-end tokens/s | tokens |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(decode[1])
    for clients in CLIENTS:
        rounds = " ".join(f"{d / b:.2f}x" for d, b in zip(decode[clients], decode[1]))
        print(f"| {clients} | {statistics.median(decode[clients]):.2f} | {statistics.median(decode[clients]) / base:.2f}x | {rounds} "
              f"| {statistics.median(end_to_end[clients]):.2f} | {tokens[clients]} |")

    # An editor's next request: the file above the cursor again, and a line more.
    def next_request(server):
        firsts = []
        for run in range(3):
            before = prompt_ids(200 + run)
            server.stream(before, new=1)
            start, times = server.stream(before + prompt_ids(300 + run)[:EDIT], new=1)
            firsts.append(times[0] - start)
        return statistics.median(firsts)

    cached = next_request(server)
    server.stop()
    server = Server(model_dir, threads, max_batch=8, extra=["--prefix_cache_tokens", "0"])
    whole = next_request(server)
    server.stop()
    print(f"\n| an editor's next request: the last prompt ({PROMPT} tokens) and {EDIT} more | time to first token s, median of 3 |")
    print("|---|---|")
    print(f"| HF transformers generate ({PROMPT}-token prompt, one client above: a whole prefill) | {hf_ttft:.2f} |")
    print(f"| worker serve --prefix_cache_tokens 0 (a whole prefill) | {whole:.2f} |")
    print(f"| worker serve (prefix cache: prefills the {EDIT} new tokens) | {cached:.3f} |")
    print(f"\nprefix cache: time to first token {whole / cached:.1f}x shorter than without it, {hf_ttft / cached:.1f}x than HF.")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
