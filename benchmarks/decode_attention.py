#!/usr/bin/env python
"""Batched decode attention, two ways, interleaved in one run: `_grouped_attention` with the
boolean mask in every layer, against `_grouped_decode` with the additive mask made once per
forward (one baddbmm for scale and mask, the softmax upcasting itself).

    .venv/bin/python benchmarks/decode_attention.py [--batches 8,32,64] [--position 120]

A full decode step of the runner (SmolLM2, bf16) at each batch, medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from steerserve.decoding.model import fused
from steerserve.decoding.model.loader import load_model
from steerserve.decoding.model.runner import ModelRunner


def boolean_only(self, mask: torch.Tensor, dtype: torch.dtype) -> fused.AttentionMasks:
    return fused.AttentionMasks(mask)  # the grouped path with the boolean mask per layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32,64")
    parser.add_argument("--position", type=int, default=120, help="keys each row attends")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("SmolLM2-135M-Instruct", dtype="bfloat16", max_model_len=512)
    batches = [int(b) for b in args.batches.split(",")]
    runner = ModelRunner(loaded, max(batches))
    variants = {"boolean mask per layer": boolean_only,
                "additive once + baddbmm": fused.FusedDecoder._masks}
    print("| batch | " + " | ".join(f"{name} ms" for name in variants) + " | ratio |")
    print("|---|" + "---|" * (len(variants) + 1))
    position = args.position
    with torch.inference_mode():
        for batch in batches:
            runner.prefill(0, [[1] + [100 + i] * (position - 1) for i in range(batch)],
                           [False] * batch)
            times: dict[str, list[float]] = {name: [] for name in variants}
            for round_index in range(args.rounds + 2):
                for name, masks in variants.items():
                    fused.FusedDecoder._masks = masks
                    start = time.perf_counter()
                    runner.decode(0, [5] * batch, [position] * batch)
                    if round_index >= 2:  # two warm-up rounds
                        times[name].append((time.perf_counter() - start) * 1000)
            medians = [statistics.median(values) for values in times.values()]
            print(f"| {batch} | " + " | ".join(f"{m:.1f}" for m in medians)
                  + f" | {medians[1] / medians[0]:.3f}x |")


if __name__ == "__main__":
    main()
