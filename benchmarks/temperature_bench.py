#!/usr/bin/env python
"""Adaptive temperature benchmark: 8 concurrent streamed requests at a fixed temperature
against the same requests under EDT, llama.cpp's dynatemp and a learned head, on one server
(runs interleaved, best kept).

    .venv/bin/python benchmarks/temperature_bench.py [--concurrency 8] [--max-tokens 128]

Not a test: it takes minutes.
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
HEAD = REPO / "examples" / "heads" / "smollm2-temperature.safetensors"
RULES = {
    "fixed 0.8": {},
    "edt": {"adaptive_temperature": {"method": "edt", "t0": 0.8}},
    "dynatemp": {"adaptive_temperature": {"method": "dynatemp", "range": 0.5}},
    "learned head": {"adaptive_temperature": {"method": "learned", "head": "smollm2"}},
}


def bodies(rule: dict, max_tokens: int):
    learned = rule.get("adaptive_temperature", {}).get("method") == "learned"
    temperature = {} if learned else {"temperature": 0.8}  # the head picks it

    def body(prompt: str) -> dict:
        return {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "stream": True, "ignore_eos": True, "seed": 1,
                "stream_options": {"include_usage": True}, **temperature, **rule}

    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best kept)")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "temperature.json")
    args = parser.parse_args()
    port = free_port()
    command = [str(REPO / ".venv/bin/steerserve"), "serve", "--port", str(port),
               "--log-level", "warning", "--vectors-dir", "none",
               "--temperature-head", f"smollm2={HEAD}"]
    cases = {name: (lambda rule=rule: bodies(rule, args.max_tokens))
             for name, rule in RULES.items()}
    with ManagedServer("steerserve", command, port, REPO / ".bench" / "logs" / "temp.log",
                       env={}, unset_env=("STEERSERVE_API_KEY",)) as server:
        server.wait_healthy(600)
        best = run_interleaved(f"{server.base_url}/v1/chat/completions", cases,
                               args.concurrency, args.repeats)
    print(ratio_table(best, f"rule ({args.concurrency} concurrent x {args.max_tokens} tokens)"))
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                    "tok_per_s": best}, indent=1))


if __name__ == "__main__":
    main()
