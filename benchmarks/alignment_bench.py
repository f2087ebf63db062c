#!/usr/bin/env python
"""In-context alignment (URIAL) on the embedded model: what the constant prefix costs in time
to first token once the prefix cache holds it, and what it changes in the answers.

    .venv/bin/python benchmarks/alignment_bench.py [--rounds 12] [--max-tokens 96]

1. TTFT: streamed chat, one request at a time, distinct questions, the model's own chat
   template against URIAL, alternating; the first URIAL request (nothing cached) apart.
2. Answers: greedy, for a fixed set of factual questions, rendered three ways: the model's
   chat template, URIAL, and a bare "Question: ... Answer:" completion (how a base model is
   prompted without either); URIAL also with a repetition penalty, as greedy decoding of a
   model this small loops. Reported: how often the answer names the expected word, how
   often the model ends the answer itself (not the token limit), and the mean length.
SmolLM2-135M-Instruct is the only model shipped, and it is already tuned for chat: URIAL's
claim is about base models, so part 2 shows what the prefix does here, not the paper's gain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_servers import ManagedServer, free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
# (question, a word a right answer names), lower-case match.
FACTS = [
    ("What is the capital of France?", "paris"), ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"), ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"), ("What is the capital of Egypt?", "cairo"),
    ("What is the capital of Russia?", "moscow"), ("What is the capital of England?", "london"),
    ("What colour is the sky on a clear day?", "blue"), ("What colour is grass?", "green"),
    ("What colour is snow?", "white"), ("What colour is a ripe banana?", "yellow"),
    ("How many legs does a spider have?", "eight"), ("How many days are in a week?", "seven"),
    ("What gas do plants take in to make food?", "carbon dioxide"),
    ("What is the largest planet in the solar system?", "jupiter"),
    ("What is the closest star to Earth?", "sun"), ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"), ("Which animal is known as the king of the "
                                               "jungle?", "lion"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What planet is known as the red planet?", "mars"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
]
TTFT_QUESTIONS = [f"Tell me about {topic}." for topic in (
    "volcanoes", "the moon", "bread", "trains", "owls", "glaciers", "coffee", "bridges",
    "tigers", "rainbows", "deserts", "pianos", "comets", "forests", "tides", "salt")]


def ttft(client: httpx.Client, base: str, question: str, alignment: str) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}],
            "max_tokens": 4, "temperature": 0, "stream": True,
            "in_context_alignment": alignment}
    start = time.perf_counter()
    with client.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token came back")


def ttft_table(client: httpx.Client, base: str, rounds: int) -> str:
    first_urial = ttft(client, base, "Tell me about clouds.", "urial")
    times: dict[str, list[float]] = {"none": [], "urial": []}
    for i in range(rounds):
        for alignment in ("none", "urial"):
            question = TTFT_QUESTIONS[(2 * i + (alignment == "urial")) % len(TTFT_QUESTIONS)]
            times[alignment].append(ttft(client, base, question, alignment))
    plain, urial = (statistics.median(times[a]) * 1000 for a in ("none", "urial"))
    return "\n".join([
        "| rendering | prompt tokens | TTFT p50 ms |", "|---|---|---|",
        f"| model's chat template | {prompt_tokens(client, base, 'none')} | {plain:.1f} |",
        f"| URIAL, prefix cached | {prompt_tokens(client, base, 'urial')} | {urial:.1f} "
        f"({urial / plain:.2f}x) |",
        f"| URIAL, first request (nothing cached) | | {first_urial * 1000:.1f} |"])


def prompt_tokens(client: httpx.Client, base: str, alignment: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": TTFT_QUESTIONS[0]}],
            "max_tokens": 1, "in_context_alignment": alignment}
    return client.post(f"{base}/v1/chat/completions", json=body).json()["usage"][
        "prompt_tokens"]


MODES = {"model's chat template": {"in_context_alignment": "none"},
         "URIAL": {"in_context_alignment": "urial"},
         "URIAL, repetition_penalty 1.2": {"in_context_alignment": "urial",
                                           "repetition_penalty": 1.2},
         "bare completion": {}}


def answer(client: httpx.Client, base: str, question: str, mode: str,
           max_tokens: int) -> tuple[str, str, int]:
    common = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, **MODES[mode]}
    if mode == "bare completion":
        body = {**common, "prompt": f"Question: {question}\nAnswer:", "stop": ["\nQuestion:"]}
        reply = client.post(f"{base}/v1/completions", json=body).json()
        choice, text = reply["choices"][0], reply["choices"][0]["text"]
    else:
        body = {**common, "messages": [{"role": "user", "content": question}]}
        reply = client.post(f"{base}/v1/chat/completions", json=body).json()
        choice = reply["choices"][0]
        text = choice["message"]["content"]
    return text, choice["finish_reason"], reply["usage"]["completion_tokens"]


def answers_table(client: httpx.Client, base: str, max_tokens: int) -> tuple[str, dict]:
    rows, samples = [], {}
    for mode in MODES:
        results = [(expected, *answer(client, base, q, mode, max_tokens))
                   for q, expected in FACTS]
        right = sum(expected in text.lower() for expected, text, _, _ in results)
        ended = sum(reason == "stop" for _, _, reason, _ in results)
        length = statistics.mean(tokens for *_, tokens in results)
        rows.append(f"| {mode} | {right}/{len(FACTS)} | {ended}/{len(FACTS)} | {length:.1f} |")
        samples[mode] = [text for _, text, _, _ in results[:3]]
    header = ["| rendering | names the answer | ends by itself | mean tokens |",
              "|---|---|---|---|"]
    return "\n".join(header + rows), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="TTFT requests per rendering")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    port = free_port()
    command = [str(REPO / ".venv/bin/steerserve"), "serve", "--port", str(port),
               "--log-level", "warning", "--vectors-dir", "none"]
    with ManagedServer("steerserve", command, port, REPO / ".bench" / "logs" / "alignment.log",
                       env={}, unset_env=("STEERSERVE_API_KEY",)) as server:
        server.wait_healthy(600)
        with httpx.Client(timeout=300) as client:
            ttft(client, server.base_url, "Warm up.", "none")
            print(ttft_table(client, server.base_url, args.rounds), flush=True)
            print()
            table, samples = answers_table(client, server.base_url, args.max_tokens)
    print(table)
    print()
    print(json.dumps(samples, indent=1))


if __name__ == "__main__":
    main()
