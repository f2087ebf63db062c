#!/usr/bin/env python
"""Where a decode step's time goes, by phase, beside the step's matmul floor of the same run.

    .venv/bin/python benchmarks/step_profile.py [--batches 1,64] [--steps 40] [--threads 2]
        [--compile-decode]

On the embedded SmolLM2 in the server's default dtype (bf16 where the CPU has it), an engine
with `batch` running greedy requests (chat-templated prompts, EOS ignored) takes `steps`
decode steps on a thread of its own, as the server's engine does; each phase is timed
inclusively by wrapping the function that does it:

  step                       Engine.step, all of it
    inbox                    draining the inbox
    plan                     Scheduler.plan
    compute                  StepComputer: forwards, the methods' mix, sampling
      forward                model/forward.run: the decoder and the LM head
        compiled graph       the compiled decode forward (--compile-decode), LM head included
        attention            SDPA or the grouped matmuls, over the slot cache
        KV cache write       CacheWindow.update
        LM head              ModelRunner.logits
      mix                    next_token_rows: the methods' combination of lane logits
      sampling               the sampler
    commit                   Engine._commit: lanes advance, detokenizing, outputs to sinks
  matmul floor               every projection and the LM head as one torch matmul each
  packed floor               the same products on the packed weights the forward runs

Per-step milliseconds (mean over the timed steps, after warm-up steps). The HTTP side (SSE
formatting, the event loop sharing the GIL with the engine thread) is not in here: compare a
step here with the server's inter-token latency at the same batch (serving_bench.py).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from steerserve.decoding.engine import compute as compute_module
from steerserve.decoding.engine import scheduler as scheduler_module
from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.methods.plain import Plain
from steerserve.decoding.model import compiled as compiled_module
from steerserve.decoding.model import forward as forward_module
from steerserve.decoding.model import fused as fused_module
from steerserve.decoding.model import kv_cache as kv_cache_module
from steerserve.decoding.model import runner as runner_module
from steerserve.decoding.model.loader import cpu_has_native_bf16, load_model
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_client import PROMPTS  # noqa: E402
from step_floor import floor_case  # noqa: E402

PHASES = ("step", "inbox", "plan", "compute", "forward", "compiled graph", "attention",
          "KV cache write", "LM head", "mix", "sampling", "commit", "matmul floor",
          "packed floor")
DEPTH = {"inbox": 1, "plan": 1, "compute": 1, "commit": 1, "forward": 2, "mix": 2,
         "sampling": 2, "compiled graph": 3, "attention": 3, "KV cache write": 3,
         "LM head": 3}


class PhaseTimers:
    """Inclusive wall time per phase, by wrapping the functions that do each one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.on = False

    def wrap(self, owner: object, name: str, phase: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        setattr(owner, name, timed)


def instrument(timers: PhaseTimers) -> None:
    timers.wrap(Engine, "step", "step")
    timers.wrap(Engine, "_drain_inbox", "inbox")
    timers.wrap(scheduler_module.Scheduler, "plan", "plan")
    timers.wrap(compute_module.StepComputer, "__call__", "compute")
    timers.wrap(forward_module, "run", "forward")
    timers.wrap(compiled_module.CompiledDecode, "__call__", "compiled graph")
    timers.wrap(fused_module.FusedDecoder, "_grouped_attention", "attention")
    timers.wrap(fused_module.FusedDecoder, "_grouped_decode", "attention")
    timers.wrap(F, "scaled_dot_product_attention", "attention")
    timers.wrap(kv_cache_module.CacheWindow, "update", "KV cache write")
    timers.wrap(runner_module.ModelRunner, "logits", "LM head")
    timers.wrap(compute_module, "next_token_rows", "mix")
    timers.wrap(compute_module, "sample", "sampling")
    timers.wrap(Engine, "_commit", "commit")


def busy_engine(loaded, batch: int, compile_decode: bool) -> Engine:
    """An engine with `batch` greedy requests, all past their prefill."""
    # the server's default 8 prefix-cache slots: a graph compiled for a cache of only two
    # slots ran a one-row step 1.5x slower (55 against 36 ms)
    engine = Engine(loaded, EngineConfig(max_num_seqs=max(batch, 2), prefix_cache_slots=8,
                                         compile_decode=compile_decode))
    tokenizer = loaded.tokenizer
    for i in range(batch):
        messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        prompt = tuple(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))
        params = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
        engine.submit(EngineRequest(str(i), prompt, params, Plain((LaneSpec(loaded.name,
                                                                            prompt),))),
                      lambda _: None)
    while len(engine.primary.slots.lanes) < batch or not all(
            lane.prefilled for lane in engine.primary.slots.lanes):
        engine.step()
    return engine


def on_engine_thread(work: Callable[[], None]) -> None:
    """Run `work` on a thread of its own, as the server steps its engine: a thread's glibc
    arena keeps a step's large freed buffers, the main thread's gives them back to the
    kernel and faults them in again the next step (8% of a 64-row step: 205 against 189 ms)."""
    failed: list[BaseException] = []

    def run() -> None:
        torch.set_num_threads(threads)  # an OpenMP setting of each thread
        try:
            work()
        except BaseException as exc:  # re-raised on the main thread
            failed.append(exc)

    threads = torch.get_num_threads()
    thread = threading.Thread(target=run, name="steerserve-engine")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def profile(loaded, timers: PhaseTimers, batch: int, steps: int, warmup: int,
            compile_decode: bool) -> dict[str, float]:
    timers.seconds.clear()
    engine = busy_engine(loaded, batch, compile_decode)
    on_engine_thread(lambda: _timed_steps(engine, timers, batch, steps, warmup))
    return {phase: timers.seconds.get(phase, 0.0) * 1000 / steps for phase in PHASES}


def _timed_steps(engine: Engine, timers: PhaseTimers, batch: int, steps: int,
                 warmup: int) -> None:
    with torch.inference_mode():
        for _ in range(warmup):
            engine.step()
        timers.on = True
        for _ in range(steps):
            engine.step()
        timers.on = False
    for name, packed in (("matmul floor", False), ("packed floor", True)):
        floor = floor_case(engine.primary.runner, batch, packed)
        floor()
        start = time.perf_counter()
        for _ in range(steps):
            floor()
        timers.seconds[name] = time.perf_counter() - start


def table(results: dict[int, dict[str, float]]) -> str:
    batches = sorted(results)
    lines = ["| phase | " + " | ".join(f"batch {b} ms" for b in batches) + " | "
             + " | ".join(f"share at {b}" for b in batches) + " |",
             "|---|" + "---|" * (2 * len(batches))]
    for phase in PHASES:
        name = "&nbsp;&nbsp;" * DEPTH.get(phase, 0) + phase
        values = [results[b][phase] for b in batches]
        shares = [results[b][phase] / results[b]["step"] for b in batches]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " | "
                     + " | ".join(f"{s:.0%}" for s in shares) + " |")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=_int_list, default=[1, 64], help="running requests")
    parser.add_argument("--steps", type=int, default=40, help="timed decode steps per batch")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--dtype", default=None, help="default: the server's (auto)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="the engine's decode runs the compiled graph (compiles per batch)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if cpu_has_native_bf16() else "float32")
    loaded = load_model("SmolLM2-135M-Instruct", dtype=dtype, max_model_len=2048)
    results: dict[int, dict[str, float]] = {}
    timers = PhaseTimers()
    instrument(timers)
    for batch in args.batches:  # the engine built outside inference mode, as the server's
        print(f"[profile] batch {batch}", file=sys.stderr, flush=True)
        results[batch] = profile(loaded, timers, batch, args.steps, args.warmup,
                                 args.compile_decode)
    graph = ", --compile-decode" if args.compile_decode else ""
    print(f"{dtype}, {args.threads} threads{graph}, {args.steps} decode steps per batch "
          f"(mean ms per step)\n")
    print(table(results))


if __name__ == "__main__":
    main()
