"""The official openai SDK sending `suffix`, as Tabby's openai/completion backend and
OpenAI-compatible editors do, against `worker serve`.

    python openai_fim.py BASE_URL CASES_JSON  ->  JSON on stdout

CASES_JSON is a list of {"prompt": str, "suffix": str or null}. For each: a greedy completion,
plain and streamed (the streamed text joined).
"""

import json
import sys

from openai import OpenAI


def main(base_url, cases):
    client = OpenAI(base_url=base_url, api_key="dummy", max_retries=0)
    out = []
    for case in cases:
        extra = {} if case["suffix"] is None else {"suffix": case["suffix"]}
        plain = client.completions.create(model="m", prompt=case["prompt"], max_tokens=8, temperature=0, **extra)
        chunks = client.completions.create(model="m", prompt=case["prompt"], max_tokens=8, temperature=0, stream=True, **extra)
        streamed = "".join(choice.text for chunk in chunks for choice in chunk.choices)
        out.append({"text": plain.choices[0].text, "finish_reason": plain.choices[0].finish_reason,
                    "prompt_tokens": plain.usage.prompt_tokens, "streamed": streamed})
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
