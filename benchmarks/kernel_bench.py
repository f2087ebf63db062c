#!/usr/bin/env python
"""Every Triton kernel against its PyTorch reference, and the dense PyTorch path where there is
one, at SmolLM2-135M serving shapes on a CUDA GPU.

    PYTHONPATH=src:. python3 benchmarks/kernel_bench.py [--dtype bfloat16] [--ops lora,steer]
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/kernel_bench.py --smoke   # CPU, tiny shapes

Shapes: hidden 576, 9 heads x 64, intermediate 1536, vocab 49152, LoRA rank 16 in 8 slots;
decode is 64 rows (and 1 row) of one position, prefill 8 segments x 128 positions. The dense
column is the path the server takes without Triton: `combine_lanes_dense`, the steering and
SAE `*_dense` ops, and for LoRA the stacked-slots matmul of adapters/lora/bank.py (its weights
and mask prepared per batch, outside the timing, as the bank does). In-place ops run on the
same tensors call after call (parameters chosen so values stay finite).

Timing (microseconds per call, median of rounds): back-to-back calls between two CUDA events,
so host launch cost and the references' host syncs count, as in an eager decode step
(calls slower than --budget-ms: 3 rounds of one call);
--do-bench uses triton.testing.do_bench instead (GPU time with L2 flushed, launch cost hidden).
Under --smoke: time.perf_counter, one call per round. "max abs diff" is Triton against the
reference on fresh copies of the inputs (a sanity column; -inf equal on both sides counts 0).
Sized to finish within a minute on an H200, Triton compilation included (the wall time
goes to stderr); --ops and --budget-ms trim it.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():  # read when the kernels are decorated (tests/kernels/conftest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from steerserve.kernels.adaptive_temperature.ops import (  # noqa: E402
    TempMethod,
    adaptive_temperature_torch,
    adaptive_temperature_triton,
)
from steerserve.kernels.combine.ops import (  # noqa: E402
    combine_lanes_dense,
    combine_lanes_torch,
    combine_lanes_triton,
)
from steerserve.kernels.lora import ops as lora  # noqa: E402
from steerserve.kernels.sae.dense import sae_edit_dense  # noqa: E402
from steerserve.kernels.sae.ops import MODE_ADD as SAE_ADD  # noqa: E402
from steerserve.kernels.sae.ops import MODE_CLAMP as SAE_CLAMP  # noqa: E402
from steerserve.kernels.sae.ops import sae_edit_torch, sae_edit_triton  # noqa: E402
from steerserve.kernels.steering.dense import (  # noqa: E402
    steer_heads_dense,
    steer_residual_dense,
)
from steerserve.kernels.steering.ops import (  # noqa: E402
    MODE_ABLATE,
    MODE_ADD,
    MODE_CLAMP,
    steer_heads_torch,
    steer_heads_triton,
    steer_residual_torch,
    steer_residual_triton,
)

Impl = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Shapes:
    hidden: int
    heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rank: int
    slots: int  # LoRA adapter slots
    rows: int  # decode batch
    segments: int  # prefill: segments x segment_len positions
    segment_len: int
    vectors: int  # steering vectors / head offsets in the table
    features: int  # SAE features in one launch


FULL = Shapes(hidden=576, heads=9, head_dim=64, intermediate=1536, vocab=49152, rank=16,
              slots=8, rows=64, segments=8, segment_len=128, vectors=16, features=32)
SMOKE = Shapes(hidden=32, heads=2, head_dim=16, intermediate=48, vocab=300, rank=4,
               slots=3, rows=4, segments=2, segment_len=8, vectors=4, features=6)


@dataclass
class Case:
    op: str
    shape: str
    args: Callable[[], tuple]  # fresh arguments (the tensors an op updates are copies)
    triton: Impl  # each returns its result tensor (the updated one for in-place ops)
    reference: Impl
    dense: Impl | None = None


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype  # of hidden states, LoRA weights and activations
    gen: torch.Generator  # on the CPU: the same inputs on every device

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device, dtype)

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen).to(self.device)

    def tensor(self, values: object, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)


def returning(fn: Callable[..., object], position: int) -> Impl:
    """An in-place op as a function returning the argument it updates."""
    def run(*args: object) -> torch.Tensor:
        fn(*args)
        return args[position]

    return run


# --------------------------------------------------------------------------- LoRA


def lora_dense(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
               token_slots: torch.Tensor, x_pos: int = 0, y_pos: int = -1) -> Impl:
    """LoraBank's dense path: the slots in use stacked, one mask of scalings per batch."""
    used = sorted({s for s in token_slots.tolist() if s >= 0})
    rank, dtype = lora_a.shape[1], lora_a.dtype
    a_used = lora_a[used].reshape(-1, lora_a.shape[2])  # (U * R, K)
    b_used = lora_b[used].transpose(1, 2).reshape(-1, lora_b.shape[1])  # (U * R, OUT)
    block = token_slots.unsqueeze(1) == torch.tensor(used, device=token_slots.device)  # (N, U)
    mask = (block.to(dtype) * scaling[used].to(dtype)).repeat_interleave(rank, dim=1)

    def run(*args: torch.Tensor) -> torch.Tensor:
        x, y = args[x_pos], args[y_pos]
        return y.addmm_((x @ a_used.T).mul_(mask), b_used)

    return run


def lora_weights(env: Env, s: Shapes, k: int, n_out: int) -> tuple[torch.Tensor, ...]:
    a = env.randn(s.slots, s.rank, k, dtype=env.dtype) / math.sqrt(k)  # (S, R, K)
    b = env.randn(s.slots, n_out, s.rank, dtype=env.dtype) / math.sqrt(s.rank)  # (S, OUT, R)
    return a, b, 0.5 + env.rand(s.slots)  # scaling (S,) fp32


def bgmv_cases(env: Env, s: Shapes, rows: int) -> list[Case]:
    idx = env.tensor([r % s.slots for r in range(rows)], torch.int64)  # every slot in use
    label = f"decode {rows} x {s.hidden}->{s.intermediate} r{s.rank}"
    a, b, scaling = lora_weights(env, s, s.hidden, s.intermediate)
    x, y = env.randn(rows, s.hidden, dtype=env.dtype), env.randn(rows, s.intermediate,
                                                                  dtype=env.dtype)
    t = env.randn(rows, s.rank, dtype=env.dtype)
    cases = [
        Case("lora_shrink_bgmv", f"decode {rows} x {s.hidden}->r{s.rank}",
             lambda: (x, a, idx), lora.lora_shrink_bgmv_triton, lora.lora_shrink_bgmv_torch),
        Case("lora_expand_bgmv", f"decode {rows} x r{s.rank}->{s.intermediate}",
             lambda: (t, b, idx, scaling, y.clone()),
             returning(lora.lora_expand_bgmv_triton, -1),
             returning(lora.lora_expand_bgmv_torch, -1)),
        Case("apply_lora_bgmv", label, lambda: (x, a, b, idx, scaling, y.clone()),
             returning(lora.apply_lora_bgmv_triton, -1),
             returning(lora.apply_lora_bgmv_torch, -1), lora_dense(a, b, scaling, idx)),
    ]
    # down_proj: the wide input
    a2, b2, _ = lora_weights(env, s, s.intermediate, s.hidden)
    x2, y2 = env.randn(rows, s.intermediate, dtype=env.dtype), env.randn(rows, s.hidden,
                                                                         dtype=env.dtype)
    cases.append(Case("apply_lora_bgmv", f"decode {rows} x {s.intermediate}->{s.hidden} "
                      f"r{s.rank}", lambda: (x2, a2, b2, idx, scaling, y2.clone()),
                      returning(lora.apply_lora_bgmv_triton, -1),
                      returning(lora.apply_lora_bgmv_torch, -1),
                      lora_dense(a2, b2, scaling, idx)))
    return cases


def sgmv_cases(env: Env, s: Shapes) -> list[Case]:
    n, g, seg = s.segments * s.segment_len, s.segments, s.segment_len
    starts = env.tensor(list(range(0, n + 1, seg)), torch.int64)  # (G + 1,)
    adapter = env.tensor([i % s.slots for i in range(g)], torch.int64)  # (G,)
    token_slots = adapter.repeat_interleave(seg)  # (N,): what the dense path routes by
    where = f"prefill {g}x{seg}"
    cases = []
    for k, n_out in ((s.hidden, s.intermediate), (s.intermediate, s.hidden)):
        a, b, scaling = lora_weights(env, s, k, n_out)
        x, y = env.randn(n, k, dtype=env.dtype), env.randn(n, n_out, dtype=env.dtype)
        if k == s.hidden:
            t = env.randn(n, s.rank, dtype=env.dtype)
            cases += [
                Case("lora_shrink_sgmv", f"{where} x {k}->r{s.rank}",
                     lambda x=x, a=a: (x, a, starts, adapter, seg),
                     lora.lora_shrink_sgmv_triton, lora.lora_shrink_sgmv_torch),
                Case("lora_expand_sgmv", f"{where} x r{s.rank}->{n_out}",
                     lambda t=t, b=b, scaling=scaling, y=y:
                         (t, b, starts, adapter, scaling, y.clone(), seg),
                     returning(lora.lora_expand_sgmv_triton, -2),
                     returning(lora.lora_expand_sgmv_torch, -2)),
            ]
        cases.append(Case(
            "apply_lora_sgmv", f"{where} x {k}->{n_out} r{s.rank}",
            lambda x=x, a=a, b=b, scaling=scaling, y=y:
                (x, a, b, starts, adapter, scaling, y.clone(), seg),
            returning(lora.apply_lora_sgmv_triton, -2), returning(lora.apply_lora_sgmv_torch, -2),
            lora_dense(a, b, scaling, token_slots, y_pos=-2)))
    return cases


# --------------------------------------------------------------------------- steering, SAE


def steer_residual_case(env: Env, s: Shapes, rows: int, seq: int, where: str) -> Case:
    k = 4
    vectors = env.randn(s.vectors, s.hidden) * 0.5  # fp32, as loaded
    hidden = env.randn(rows, seq, s.hidden, dtype=env.dtype)
    # Items add, clamp, ablate, add; every fourth row unsteered. Half the rows keep their norm.
    index = [[-1] * k if r % 4 == 3 else [(r + j) % s.vectors for j in range(k)]
             for r in range(rows)]
    modes = [[MODE_ADD, MODE_CLAMP, MODE_ABLATE, MODE_ADD]] * rows
    index_t, mode_t = env.tensor(index, torch.int32), env.tensor(modes, torch.int8)
    scale, normalize = env.rand(rows, k) * 2, env.tensor([r % 2 == 0 for r in range(rows)],
                                                         torch.bool)
    return Case("steer_residual", f"{where} {rows} x {seq} x {s.hidden}, K={k}",
                lambda: (hidden.clone(), vectors, index_t, scale, mode_t, normalize),
                steer_residual_triton, steer_residual_torch, steer_residual_dense)


def steer_heads_case(env: Env, s: Shapes, rows: int, seq: int, where: str) -> Case:
    offsets = env.randn(s.vectors, s.heads, s.head_dim) * 0.5  # (O, heads, head_dim) fp32
    offsets[:, min(3, s.heads - 1):] = 0  # ITI steers a few heads; the others stay bit-exact
    attn_out = env.randn(rows, seq, s.heads * s.head_dim, dtype=env.dtype)
    index = env.tensor([-1 if r % 4 == 3 else r % s.vectors for r in range(rows)], torch.int32)
    scale = env.rand(rows) * 4
    return Case("steer_heads", f"{where} {rows} x {seq} x {s.heads}x{s.head_dim}",
                lambda: (attn_out.clone(), offsets, index, scale),
                steer_heads_triton, steer_heads_torch, steer_heads_dense)


def sae_case(env: Env, s: Shapes, rows: int, seq: int, where: str) -> Case:
    f, u = 4, s.features
    encoders = env.randn(u, s.hidden) / math.sqrt(s.hidden)  # (U, H) fp32
    decoders = env.randn(u, s.hidden) / math.sqrt(s.hidden)
    enc_bias = env.randn(u) * 0.01
    threshold = env.tensor([0.0 if j % 2 == 0 else 0.05 for j in range(u)], torch.float32)
    hidden = env.randn(rows, seq, s.hidden, dtype=env.dtype)
    index = env.tensor([[(r * f + j) % u for j in range(f)] for r in range(rows)], torch.int32)
    mode = env.tensor([[SAE_ADD, SAE_CLAMP, SAE_CLAMP, SAE_ADD]] * rows, torch.int8)
    value = env.rand(rows, f)
    return Case("sae_edit", f"{where} {rows} x {seq} x {s.hidden}, U={u} F={f}",
                lambda: (hidden.clone(), encoders, enc_bias, threshold, decoders, index, mode,
                         value),
                sae_edit_triton, sae_edit_torch, sae_edit_dense)


# --------------------------------------------------------------------------- logits ops


def combine_case(env: Env, s: Shapes, rows: int) -> Case:
    # Even rows: proxy-tuning (base + expert - anti-expert log-softmaxes). Odd rows:
    # contrastive (expert - 0.5 amateur) inside the expert's plausible set, alpha 0.1.
    index, weight, plausible, alpha, lanes = [], [], [], [], 0
    for r in range(rows):
        if r % 2 == 0:
            index.append([lanes, lanes + 1, lanes + 2])
            weight.append([1.0, 1.0, -1.0])
            plausible.append(-1)
            alpha.append(1.0)
            lanes += 3
        else:
            index.append([lanes, lanes + 1, -1])
            weight.append([1.0, -0.5, 0.0])
            plausible.append(lanes)
            alpha.append(0.1)
            lanes += 2
    logits, temperature = env.randn(lanes, s.vocab) * 2, 0.7 + 0.6 * env.rand(lanes)
    args = (logits, temperature, env.tensor(index, torch.int32),
            env.tensor(weight, torch.float32), env.tensor([True] * rows, torch.bool),
            env.tensor(plausible, torch.int32), env.tensor(alpha, torch.float32))
    return Case("combine_lanes", f"decode {rows} x {lanes} lanes x V{s.vocab}, M=3",
                lambda: args, combine_lanes_triton, combine_lanes_torch, combine_lanes_dense)


def temperature_case(env: Env, s: Shapes, rows: int) -> Case:
    # Rows cycle fixed, EDT, dynatemp, given; every T > 1, so scaling in place again and
    # again only flattens the logits (they stay finite).
    methods = [TempMethod.FIXED, TempMethod.EDT, TempMethod.DYNATEMP, TempMethod.GIVEN]
    params = {TempMethod.FIXED: (1.5, 0.0, 0.0), TempMethod.EDT: (1.5, 0.5, 0.8),
              TempMethod.DYNATEMP: (1.5, 0.4, 1.0), TempMethod.GIVEN: (1.2, 0.0, 0.0)}
    chosen = [methods[r % 4] if rows > 1 else TempMethod.EDT for r in range(rows)]
    t0, a, b = (env.tensor([params[m][i] for m in chosen], torch.float32) for i in range(3))
    method = env.tensor([int(m) for m in chosen], torch.int32)
    logits = env.randn(rows, s.vocab) * 3
    name = "mixed methods" if rows > 1 else "EDT"
    return Case("adaptive_temperature", f"decode {rows} x V{s.vocab}, {name}",
                lambda: (logits.clone(), method, t0, a, b),
                returning(adaptive_temperature_triton, 0),
                returning(adaptive_temperature_torch, 0))


def all_cases(env: Env, s: Shapes) -> list[Case]:
    prefill = (s.segments, s.segment_len, "prefill")
    shapes = [(s.rows, 1, "decode"), (1, 1, "decode"), prefill]
    cases = bgmv_cases(env, s, s.rows) + bgmv_cases(env, s, 1) + sgmv_cases(env, s)
    for make in (steer_residual_case, steer_heads_case, sae_case):
        cases += [make(env, s, rows, seq, where) for rows, seq, where in shapes]
    cases += [combine_case(env, s, rows) for rows in (s.rows, 1)]
    cases += [temperature_case(env, s, rows) for rows in (s.rows, 1)]
    return cases


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_seconds(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds for `calls` back-to-back calls (CUDA events, else the wall clock)."""
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def time_us(fn: Callable[[], object], device: torch.device, rounds: int, budget_s: float,
            do_bench: bool) -> float:
    """Median microseconds per call; the first call (compilation, caches) is not timed."""
    fn()
    sync(device)
    if do_bench and device.type == "cuda":
        from triton.testing import do_bench as bench

        ms = bench(fn, warmup=max(1, int(budget_s * 250)), rep=max(1, int(budget_s * 1000)),
                   return_mode="median")
        return ms * 1000
    calls = 1
    if budget_s > 0:  # size rounds to the budget from one timed call; slow ones: 3 rounds
        estimate = max(round_seconds(fn, 1, device), 1e-7)
        calls = max(1, min(1000, int(budget_s / rounds / estimate)))
        rounds = min(rounds, max(3, int(budget_s / estimate)))
    return statistics.median(round_seconds(fn, calls, device) / calls
                             for _ in range(rounds)) * 1e6


def max_abs_diff(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float(), expected.float()
    diff = torch.where(got == expected, 0.0, (got - expected).abs())  # equal -inf: 0
    return float(diff.max()) if diff.numel() else 0.0


# --------------------------------------------------------------------------- report


def header(device: torch.device, dtype: torch.dtype, do_bench: bool, rounds: int) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        timer = ("triton.testing.do_bench, median (GPU time, L2 flushed)" if do_bench else
                 f"CUDA events over back-to-back calls, median of {rounds} rounds")
    else:
        name = f"CPU (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})"
        timer = f"time.perf_counter, one call per round, median of {rounds}"
    return (f"device: {name} | torch {torch.__version__} | triton {triton.__version__} | "
            f"dtype {str(dtype).removeprefix('torch.')} | timer: {timer}")


def fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def run_case(case: Case, device: torch.device, rounds: int, budget_s: float,
             do_bench: bool) -> str:
    diff = max_abs_diff(case.triton(*case.args()), case.reference(*case.args()))
    times = {}
    for name, impl in (("triton", case.triton), ("reference", case.reference),
                       ("dense", case.dense)):
        if impl is not None:
            args = case.args()
            times[name] = time_us(lambda impl=impl, args=args: impl(*args), device, rounds,
                                  budget_s, do_bench)
    ratio = times["reference"] / times["triton"]
    return (f"| {case.op} | {case.shape} | {fmt_us(times['triton'])} | "
            f"{fmt_us(times['reference'])} | {fmt_us(times.get('dense'))} | {ratio:.2f}x | "
            f"{diff:.2e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one call per round (CPU: Triton's interpreter)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="hidden states and LoRA weights (logits are always float32)")
    parser.add_argument("--ops", default="", help="comma-separated substrings of op names")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per measurement")
    parser.add_argument("--budget-ms", type=float, default=60.0,
                        help="timed milliseconds per measurement (calls per round follow)")
    parser.add_argument("--do-bench", action="store_true",
                        help="time with triton.testing.do_bench (GPU time only)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA device: full shapes would take hours in the interpreter; use --smoke")
    shapes, rounds = (SMOKE, 3) if args.smoke else (FULL, args.rounds)
    budget_s = 0.0 if args.smoke else args.budget_ms / 1000
    env = Env(device, getattr(torch, args.dtype), torch.Generator().manual_seed(0))
    wanted = [w for w in args.ops.split(",") if w]
    print(header(device, env.dtype, args.do_bench, rounds))
    print()
    print("| op | shape | triton us | torch reference us | dense torch us | reference/triton "
          "| max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    started = time.perf_counter()
    with torch.inference_mode():
        for case in all_cases(env, shapes):
            if not wanted or any(w in case.op for w in wanted):
                print(run_case(case, device, rounds, budget_s, args.do_bench), flush=True)
    print(f"\n{time.perf_counter() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
