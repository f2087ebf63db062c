#!/usr/bin/env python
"""fp32 vs bf16 on this machine: prefill and batched decode step times of the engine's own
model runner on the embedded model. Decides `--dtype auto` on CPU (docs/benchmarks.md).

    .venv/bin/python benchmarks/dtype_bench.py [--batches 1,32] [--prompt-tokens 40]
"""

from __future__ import annotations

import argparse
import time

import torch

from steerserve.decoding.model.loader import load_model
from steerserve.decoding.model.runner import ModelRunner


def time_runner(runner: ModelRunner, batch: int, prompt_tokens: int, steps: int):
    prompts = [[1] + [100 + i] * prompt_tokens for i in range(batch)]
    runner.prefill(0, prompts, [False] * batch)  # warm-up
    started = time.perf_counter()
    runner.prefill(0, prompts, [False] * batch)
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(steps):
        runner.decode(0, [5] * batch, [prompt_tokens + 1 + step] * batch)
    return prefill, (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt-tokens", type=int, default=40, help="prompt length per row")
    parser.add_argument("--steps", type=int, default=10, help="decode steps timed")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    print("| dtype | batch | prefill ms | decode step ms | decode tok/s |")
    print("|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner(load_model("smollm2", dtype=dtype, max_model_len=1024), 64)
        for batch in (int(b) for b in args.batches.split(",")):
            prefill, step = time_runner(runner, batch, args.prompt_tokens, args.steps)
            print(f"| {dtype} | {batch} | {prefill * 1000:.0f} | {step * 1000:.1f} | "
                  f"{batch / step:.0f} |", flush=True)


if __name__ == "__main__":
    main()
