#!/usr/bin/env python
"""Multi-LoRA benchmark: 8 concurrent requests, each on a different adapter, against the same
requests with no adapter, and against serving one adapter at a time (a single LoRA slot, so
every request waits for the slot and swaps the adapter in: what a server that cannot batch
different adapters does).

    .venv/bin/python benchmarks/lora_bench.py [--adapters 8] [--rank 8] [--max-tokens 64]

Adapters are random PEFT-format LoRAs (all seven projections) written under .bench/; their
cost does not depend on the values. Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shlex
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_client import run_level  # noqa: E402
from bench_servers import ManagedServer, free_port, log  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE = "SmolLM2-135M-Instruct"
# SmolLM2-135M: hidden 576, 9 query heads and 3 KV heads of 64, MLP 1536, 30 layers.
SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192),
          "self_attn.v_proj": (576, 192), "self_attn.o_proj": (576, 576),
          "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536), "mlp.down_proj": (1536, 576)}


def write_adapter(path: Path, rank: int, seed: int, layers: int = 30) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for module, (fan_in, fan_out) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
              "target_modules": sorted({m.split(".")[-1] for m in SHAPES}), "use_dora": False}
    (path / "adapter_config.json").write_text(json.dumps(config))


def serve_command(port: int, adapters: list[Path], max_loras: int,
                  extra: str = "") -> list[str]:
    command = [str(REPO / ".venv/bin/steerserve"), "serve", "--port", str(port),
               "--max-loras", str(max_loras), "--max-lora-rank", "16", "--log-level", "warning",
               *shlex.split(extra)]
    for i, path in enumerate(adapters):
        command += ["--lora", f"a{i}={path}"]
    return command


def measure(adapters: list[Path], max_loras: int, models: list[str], args) -> float:
    """Wall time of len(models) concurrent streamed requests, request i on models[i]."""
    port = free_port()
    log_path = REPO / ".bench" / "logs" / f"lora-bench-{max_loras}.log"
    with ManagedServer("steerserve", serve_command(port, adapters, max_loras,
                                                   args.steerserve_args), port, log_path,
                       env={}, unset_env=("STEERSERVE_API_KEY",)) as server:
        server.wait_healthy(600)
        url = f"{server.base_url}/v1/chat/completions"
        chosen = itertools.cycle(models)

        def body(prompt: str) -> dict:
            return {"model": next(chosen), "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": args.max_tokens, "stream": True, "ignore_eos": True,
                    "temperature": 0, "stream_options": {"include_usage": True}}

        asyncio.run(run_level(url, body, len(models), len(models), 600))  # warm-up
        best = min(asyncio.run(run_level(url, body, len(models), len(models), 600)).wall_s
                   for _ in range(args.repeats))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8, help="concurrent requests/adapters")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per case (best kept)")
    parser.add_argument("--steerserve-args", default="",
                        help="extra server flags, e.g. --steerserve-args=--compile-decode")
    args = parser.parse_args()
    root = REPO / ".bench" / "lora-adapters"
    paths = [root / f"a{i}" for i in range(args.adapters)]
    for i, path in enumerate(paths):
        write_adapter(path, args.rank, seed=i)
    names = [f"a{i}" for i in range(args.adapters)]
    plain = measure(paths, args.adapters, [BASE] * args.adapters, args)
    log(f"no adapter: {plain:.2f} s")
    mixed = measure(paths, args.adapters, names, args)
    log(f"mixed adapters in one batch: {mixed:.2f} s")
    swapped = measure(paths, 1, names, args)
    log(f"one adapter at a time (1 slot): {swapped:.2f} s")
    print(f"| case | wall s ({args.adapters} requests x {args.max_tokens} tokens) | ratio |")
    print("|---|---|---|")
    print(f"| no adapter | {plain:.2f} | 1.00x |")
    print(f"| {args.adapters} different adapters, one batch | {mixed:.2f} | "
          f"{mixed / plain:.2f}x of no adapter |")
    print(f"| one adapter at a time (swap per request) | {swapped:.2f} | "
          f"{swapped / mixed:.2f}x slower than mixed |")


if __name__ == "__main__":
    main()
