"""The official openai SDK against `worker serve`: what an OpenAI-compatible editor does.

    python openai_completions.py BASE_URL PROMPTS_JSON  ->  JSON on stdout

For each prompt: a greedy completion plain and streamed (the streamed text joined), with
logprobs; then n=3 sampled choices twice with one seed, and once with another.
"""

import json
import sys

from openai import OpenAI


def main(base_url, prompts):
    client = OpenAI(base_url=base_url, api_key="dummy", max_retries=0)
    cases = []
    for prompt in prompts:
        plain = client.completions.create(model="codegen", prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
        chunks = client.completions.create(model="codegen", prompt=prompt, max_tokens=16, temperature=0, stream=True)
        pieces, finish = [], None
        for chunk in chunks:
            for choice in chunk.choices:
                pieces.append(choice.text)
                finish = choice.finish_reason or finish
        choice = plain.choices[0]
        cases.append({
            "model": plain.model,
            "object": plain.object,
            "id": plain.id,
            "text": choice.text,
            "finish_reason": choice.finish_reason,
            "token_logprobs": choice.logprobs.token_logprobs,
            "top_logprobs": choice.logprobs.top_logprobs,
            "usage": plain.usage.model_dump(),
            "streamed": "".join(pieces),
            "stream_chunks": len(pieces),
            "stream_finish_reason": finish,
        })
    sample = lambda seed: [c.text for c in client.completions.create(
        model="codegen", prompt=prompts[0], max_tokens=12, temperature=0.9, n=3, seed=seed).choices]
    json.dump({"cases": cases, "seeded": [sample(7), sample(7), sample(8)]}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
