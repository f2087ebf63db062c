#!/usr/bin/env python
"""A decode step against its arithmetic floor: the model's linear layers and LM head alone.

    .venv/bin/python benchmarks/step_floor.py [--dtypes float32,bfloat16] [--batches 1,32]

For each dtype and batch size, interleaved round by round (medians): the floor (every
projection of every layer as one torch matmul each, fused QKV and gate/up shapes, plus the LM
head on one row per sequence), the same products on the weights packed for oneDNN (what our
forward runs: decoding/model/packed.py), then a full decode step of the model runner with our
own forward (packed, and with --no-packed-weights) and with the Hugging Face modules, at
position 64 of a 512-slot cache.
serving_bench.py runs the same measurement next to the servers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from steerserve.decoding.model.loader import load_model
from steerserve.decoding.model.runner import ModelRunner

POSITION = 64


def medians_ms(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(rounds + 2):
        for name, work in cases.items():
            started = time.perf_counter()
            work()
            if round_index >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def floor_case(runner: ModelRunner, batch: int, packed: bool = False) -> Callable[[], None]:
    """The step's matmuls alone: torch's on the plain weights, or the packed projections."""
    layers, dtype = runner.forward.layers, runner.loaded.dtype
    projections = [(p, p.weight) for layer in layers
                   for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    projections.append((runner.head, runner.head.weight))
    inputs = {width: torch.randn(batch, width, dtype=dtype)
              for width in {weight.shape[1] for _, weight in projections}}

    def run() -> None:
        for projection, weight in projections:
            x = inputs[weight.shape[1]]
            if packed:
                projection(x)
            else:
                F.linear(x, weight)

    return run


def step_case(runner: ModelRunner, batch: int) -> Callable[[], object]:
    runner.prefill(0, [[1] + [100 + i] * (POSITION - 1) for i in range(batch)], [False] * batch)
    return lambda: runner.decode(0, [5] * batch, [POSITION] * batch)


def measure(model: str, dtype: str, batches: list[int], rounds: int) -> list[dict]:
    loaded = load_model(model, dtype=dtype, max_model_len=512)
    runners = {kind: ModelRunner(loaded, max(batches), None, kind) for kind in ("fused", "hf")}
    runners["unpacked"] = ModelRunner(loaded, max(batches), None, "fused", packed_weights=False)
    rows = []
    with torch.inference_mode():
        for batch in batches:
            cases = {"floor": floor_case(runners["fused"], batch),
                     "packed floor": floor_case(runners["fused"], batch, packed=True)}
            cases.update({kind: step_case(runner, batch) for kind, runner in runners.items()})
            found = medians_ms(cases, rounds)
            rows.append({"dtype": dtype, "batch": batch, **found})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| dtype | batch | floor ms | packed floor ms | fused step ms | vs floor | "
             "fused, unpacked ms | HF-modules step ms | vs floor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['floor']:.1f} | "
                     f"{r['packed floor']:.1f} | {r['fused']:.1f} | "
                     f"{r['fused'] / r['floor']:.2f}x | {r['unpacked']:.1f} | {r['hf']:.1f} | "
                     f"{r['hf'] / r['floor']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    rows = [row for dtype in args.dtypes.split(",")
            for row in measure(args.model, dtype, batches, args.rounds)]
    print(table(rows))


if __name__ == "__main__":
    main()
