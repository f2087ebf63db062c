#!/usr/bin/env python
"""Scoring benchmark: echo + logprobs (what evaluation harnesses send) over a fixed set of
prompts of 50-200 tokens, plain and under each method, on one server (rounds interleaved,
best kept); prints each method's scoring cost against plain, and against its generation cost
when benchmarks/methods_bench.py has left its results in .bench/methods.json.

    .venv/bin/python benchmarks/scoring_bench.py [--concurrency 4] [--repeats 3]

Methods as the methods benchmark runs them (SmolLM2 with the example `uppercase` adapter),
except where scoring needs aligned lanes: the contrastive amateur is the adapter on the full
prompt (a last-token amateur is refused with scoring) and DoLa runs its reference
multiple-choice setting (relative_top 0). Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_servers import ManagedServer, free_port, log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
METHODS = {
    "plain": None,
    "proxy_tuning (LoRA expert)": {"method": "proxy_tuning", "expert": "uppercase",
                                   "anti_expert": MODEL, "alpha": 1.0},
    "contrastive (same-model amateur)": {"method": "contrastive", "amateur": "uppercase"},
    "sh2": {"method": "sh2", "alpha": 6.0},
    "dola (high)": {"method": "dola", "layers": "high", "relative_top": 0.0},
    "logit_arithmetic (2 terms)": {"method": "logit_arithmetic", "terms": [
        {"model": MODEL, "weight": 1.0}, {"model": "uppercase", "weight": 0.5}]},
}
SENTENCES = [
    "The river runs past the old mill and under the stone bridge before it reaches the sea.",
    "Question: which planet is known as the red planet? Answer: Mars, because of iron oxide.",
    "A careful cook tastes the soup, adds a pinch of salt and lets it simmer a little longer.",
    "In 1969 two astronauts walked on the Moon while a third orbited above in the command module.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside leaves.",
    "The library opens at nine, closes at six, and lends up to ten books to each reader.",
]


def prompts() -> list[str]:
    """Twelve prompts from about 50 to 200 tokens: 2 to 8 sentences each."""
    return [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(2 + i // 2))
            for i in range(12)]


def score_all(url: str, decoding: dict | None, texts: list[str], concurrency: int) -> float:
    """Wall seconds to score every text (echo, logprobs, no generated token)."""
    def one(text: str) -> None:
        body = {"model": MODEL, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}
        if decoding:
            body["decoding"] = decoding
        response = httpx.post(url, json=body, timeout=600)
        response.raise_for_status()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, texts))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best kept)")
    parser.add_argument("--generation", type=Path, default=REPO / ".bench" / "methods.json",
                        help="methods_bench.py results, for the generation ratios")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "scoring.json")
    args = parser.parse_args()
    port = free_port()
    command = [str(REPO / ".venv/bin/steerserve"), "serve", "--port", str(port),
               "--log-level", "warning", "--vectors-dir", "none",
               "--lora", f"uppercase={REPO / 'examples' / 'adapters' / 'uppercase'}"]
    texts = prompts()
    best: dict[str, float] = {}
    with ManagedServer("steerserve", command, port, REPO / ".bench" / "logs" / "scoring.log",
                       env={}, unset_env=("STEERSERVE_API_KEY",)) as server:
        server.wait_healthy(600)
        url = f"{server.base_url}/v1/completions"
        score_all(url, None, texts, args.concurrency)  # warm-up
        for round_index in range(args.repeats):
            for name, decoding in METHODS.items():
                seconds = score_all(url, decoding, texts, args.concurrency)
                best[name] = min(best.get(name, float("inf")), seconds)
                log(f"round {round_index}: {name}: {seconds:.2f} s")
    generation = {}
    if args.generation.exists():
        rates = json.loads(args.generation.read_text())["tok_per_s"]
        generation = {name: rates["plain"] / rate for name, rate in rates.items()}
    print(f"\n{len(texts)} prompts, {args.concurrency} in flight, best of {args.repeats}\n")
    print("| method | scoring s | scoring cost vs plain | generation cost vs plain | "
          "scoring / generation |\n|---|---|---|---|---|")
    for name, seconds in best.items():
        cost = seconds / best["plain"]
        gen = generation.get(name)
        ratio = f"{cost / gen:.2f}" if gen else "-"
        print(f"| {name} | {seconds:.2f} | {cost:.2f}x | "
              f"{f'{gen:.2f}x' if gen else '-'} | {ratio} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "seconds": best}, indent=1))


if __name__ == "__main__":
    main()
