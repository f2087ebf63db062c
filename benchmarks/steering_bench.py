#!/usr/bin/env python
"""Steering benchmark: 32 concurrent streamed requests, every one steered with a different
vector, against the same requests unsteered, on one server (runs interleaved, best kept).

    .venv/bin/python benchmarks/steering_bench.py [--concurrency 32] [--max-tokens 128]

Vectors are random safetensors control vectors (layers 8-15 by default) written under
.bench/steering-vectors and loaded with --steering-vector; their cost does not depend on
the values. A second steered case puts per-head offsets on top (3 heads on 2 layers).
Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cases import ratio_table, run_interleaved  # noqa: E402
from bench_servers import ManagedServer, free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
HIDDEN = 576  # SmolLM2-135M; 9 heads of 64


def write_vectors(root: Path, count: int, layers: range) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    flags = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        tensors = {f"direction.{layer}": torch.randn(HIDDEN, generator=generator) * 0.05
                   for layer in layers}
        path = root / f"v{i}.safetensors"
        save_file(tensors, str(path))
        flags += ["--steering-vector", f"v{i}={path}"]
    return flags


def bodies(case: str, max_tokens: int, count: int):
    """A body factory for run_level: request i steered with vector i (cycling)."""
    index = itertools.count()

    def body(prompt: str) -> dict:
        i = next(index) % count
        steering = []
        if case != "plain":
            steering.append({"vector": f"v{i}", "scale": 1.0})
        if case == "residual+heads":
            steering.append({"values": [0.01] * HIDDEN, "target": "heads",
                             "heads": [[4, 1], [4, 7], [12, i % 9]], "scale": 1.0})
        extra = {"steering": steering} if steering else {}
        return {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "temperature": 0, "stream_options": {"include_usage": True}, **extra}

    return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best kept)")
    parser.add_argument("--first-layer", type=int, default=8, help="first steered layer")
    parser.add_argument("--last-layer", type=int, default=15, help="last steered layer")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "steering.json")
    args = parser.parse_args()
    flags = write_vectors(REPO / ".bench" / "steering-vectors", args.concurrency,
                          range(args.first_layer, args.last_layer + 1))
    port = free_port()
    command = [str(REPO / ".venv/bin/steerserve"), "serve", "--port", str(port),
               "--log-level", "warning", "--vectors-dir", "none", *flags]
    n = args.concurrency
    cases = {case: (lambda case=case: bodies(case, args.max_tokens, n))
             for case in ("plain", "residual", "residual+heads")}
    with ManagedServer("steerserve", command, port, REPO / ".bench" / "logs" / "steer.log",
                       env={}, unset_env=("STEERSERVE_API_KEY",)) as server:
        server.wait_healthy(600)
        best = run_interleaved(f"{server.base_url}/v1/chat/completions", cases, n, args.repeats)
    print(ratio_table(best, f"case ({n} concurrent x {args.max_tokens} tokens)"))
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                    "tok_per_s": best}, indent=1))


if __name__ == "__main__":
    main()
