#!/usr/bin/env python
"""Mixed load: a realistic mix of requests at concurrency 32 against the same number of plain
ones, on one server (rounds interleaved, best kept).

    .venv/bin/python benchmarks/mixed_bench.py [--concurrency 32] [--max-tokens 64]

Of every six requests of the mix: two plain, two steered (each its own random control vector
on layers 8-15), one on a LoRA adapter (one of four random rank-8 adapters on every
projection), one decoded with DoLa (`"decoding": {"method": "dola"}`). Vectors and adapters
are written under .bench/; their cost does not depend on their values. Each ingredient also
runs alone (its share of the mix, the rest plain), to tell which one costs. Not a test: minutes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cases import numbered_bodies, ratio_table, run_interleaved  # noqa: E402
from bench_servers import ManagedServer, free_port  # noqa: E402
from lora_bench import write_adapter  # noqa: E402
from steering_bench import MODEL, write_vectors  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = 4


KINDS = ("steered", "adapter", "dola")


def mixed_extra(i: int, vectors: int, kinds: tuple[str, ...]) -> dict:
    """The fields that make request i of the mix what it is, for the kinds in `kinds` (the
    others stay plain; an empty dict: plain)."""
    kind = {2: "steered", 3: "steered", 4: "adapter", 5: "dola"}.get(i % 6)
    if kind not in kinds:
        return {}
    if kind == "steered":
        return {"steering": [{"vector": f"v{i % vectors}", "scale": 1.0}]}
    if kind == "adapter":
        return {"model": f"a{(i // 6) % ADAPTERS}"}  # every sixth request: i % 6 == 4
    return {"decoding": {"method": "dola"}}


def bodies(kinds: tuple[str, ...], max_tokens: int, vectors: int):
    return numbered_bodies(MODEL, max_tokens, lambda i: mixed_extra(i, vectors, kinds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best kept)")
    parser.add_argument("--out", type=Path, default=REPO / ".bench" / "mixed.json")
    parser.add_argument("--steerserve-args", default="",
                        help="extra server flags, e.g. --steerserve-args=--compile-decode")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds to get healthy (--compile-decode with LoRA slots compiles "
                             "for 220-600 s on two cores)")
    args = parser.parse_args()
    vectors = max(1, args.concurrency // 3)
    flags = write_vectors(REPO / ".bench" / "steering-vectors", vectors, range(8, 16))
    for i in range(ADAPTERS):
        path = REPO / ".bench" / "lora-adapters" / f"mix{i}"
        write_adapter(path, 8, seed=100 + i)
        flags += ["--lora", f"a{i}={path}"]
    port = free_port()
    command = [str(REPO / ".venv/bin/steerserve"), "serve", "--port", str(port),
               "--log-level", "warning", "--vectors-dir", "none", "--max-loras",
               str(ADAPTERS), *flags, *shlex.split(args.steerserve_args)]
    mixes = {"plain": (), "mixed": KINDS, "only the steered third": ("steered",),
             "only the adapter sixth": ("adapter",), "only the DoLa sixth": ("dola",)}
    cases = {name: (lambda kinds=kinds: bodies(kinds, args.max_tokens, vectors))
             for name, kinds in mixes.items()}
    with ManagedServer("steerserve", command, port, REPO / ".bench" / "logs" / "mixed.log",
                       env={}, unset_env=("STEERSERVE_API_KEY",)) as server:
        server.wait_healthy(args.startup_timeout)
        best = run_interleaved(f"{server.base_url}/v1/chat/completions", cases,
                               args.concurrency, args.repeats)
    print(ratio_table(best, f"case ({args.concurrency} concurrent x {args.max_tokens} tokens)"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                    "tok_per_s": best}, indent=1))


if __name__ == "__main__":
    main()
