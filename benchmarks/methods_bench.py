#!/usr/bin/env python
"""Multi-lane decoding benchmark: 8 concurrent streamed requests under each method against the
same requests decoded plainly, on one server (runs interleaved, best kept).

    .venv/bin/python benchmarks/methods_bench.py [--concurrency 8] [--max-tokens 128]

Methods: proxy-tuning with LoRA lanes (expert = the example uppercase adapter, anti-expert =
the base, which shares the base's lane), contrastive decoding with a same-model amateur that
sees only the last prompt token (so it is a lane of its own), SH2, DoLa ("high" bucket).
The reference implementations run each lane's forward one after another for one request at
a time, so their cost per token is at least the number of forwards times a single-stream
step; the table lists that count beside the measured ratio. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cases import ratio_table, run_interleaved  # noqa: E402
from bench_servers import ManagedServer, free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
METHODS = {
    "plain": (None, "1"),
    "proxy_tuning (LoRA expert)": ({"method": "proxy_tuning", "expert": "uppercase",
                                    "anti_expert": MODEL, "alpha": 1.0}, "3"),
    "contrastive (same-model amateur)": ({"method": "contrastive", "amateur": MODEL,
                                          "amateur_prefix": "last_token"}, "2"),
    "sh2": ({"method": "sh2", "alpha": 6.0}, "2 (+ a prompt-scoring pass)"),
    "dola (high)": ({"method": "dola", "layers": "high"}, "1 (+ 7 early-exit LM heads)"),
}


def bodies(decoding: dict | None, max_tokens: int):
    def body(prompt: str) -> dict:
        extra = {"decoding": decoding} if decoding else {}
        return {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "seed": 1,
                "temperature": 0, "stream_options": {"include_usage": True}, **extra}

    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (best kept)")
    parser.add_argument("--only", nargs="*", default=None, metavar="METHOD",
                        help="run plain and these methods only (names as in the table, "
                        "e.g. 'dola (high)')")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "methods.json")
    args = parser.parse_args()
    methods = {name: value for name, value in METHODS.items()
               if args.only is None or name == "plain" or name in args.only}
    port = free_port()
    command = [str(REPO / ".venv/bin/steerserve"), "serve", "--port", str(port),
               "--log-level", "warning", "--vectors-dir", "none",
               "--lora", f"uppercase={REPO / 'examples' / 'adapters' / 'uppercase'}"]
    cases = {name: (lambda d=decoding: bodies(d, args.max_tokens))
             for name, (decoding, _) in methods.items()}
    with ManagedServer("steerserve", command, port, REPO / ".bench" / "logs" / "methods.log",
                       env={}, unset_env=("STEERSERVE_API_KEY",)) as server:
        server.wait_healthy(600)
        best = run_interleaved(f"{server.base_url}/v1/chat/completions", cases,
                               args.concurrency, args.repeats)
    print(ratio_table(best, f"method ({args.concurrency} concurrent x {args.max_tokens} "
                            "tokens)"))
    print("\n| method | cost per token vs plain (this server) | forwards per token in the "
          "reference (sequential) |\n|---|---|---|")
    for name, (_, forwards) in methods.items():
        print(f"| {name} | {best['plain'] / best[name]:.2f}x | {forwards} |")
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                    "tok_per_s": best}, indent=1))


if __name__ == "__main__":
    main()
