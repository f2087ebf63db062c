#!/usr/bin/env python
"""The engine on a CUDA GPU: a decode step against its matmul floor, the engine's own cost, and
end-to-end tokens per second against Hugging Face `generate` in the same run.

    PYTHONPATH=src:. python3 benchmarks/gpu_bench.py --model-dir DIR [--dtype bfloat16]

DIR holds a Hugging Face config and tokenizer (no weights needed: a GPU machine here cannot
download the model and the embedded GGUF is too large to carry). The weights are random with
the config's shapes: the tokens are nonsense, every timing is the real model's. Each call is
timed on the host with the device synchronized after it, so host-side overhead counts as it
does when serving. Medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from step_floor import medians_ms
from step_overhead import running_engine
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.methods.plain import Plain
from steerserve.decoding.model.loader import LoadedModel, from_pretrained_objects
from steerserve.decoding.model.runner import ModelRunner
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.params import SamplingParams

POSITION = 64
NEW_TOKENS = 64


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synced(work: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        work()
        sync()

    return run


def random_model(model_dir: str, dtype: torch.dtype,
                 device: str) -> tuple[LoadedModel, torch.nn.Module]:
    """The config's model with seeded random weights, and an untouched copy for HF generate."""
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device, dtype)
    reference = AutoModelForCausalLM.from_config(config).to(device, dtype)
    reference.load_state_dict(model.state_dict())
    return from_pretrained_objects(model, tokenizer, "random", 1024), reference.eval()


def floor_case(loaded: LoadedModel, batch: int) -> Callable[[], None]:
    """Every projection of every layer, and the LM head, as one matmul each."""
    weights = [m.weight for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=loaded.dtype, device=loaded.device)
              for w in weights}
    return synced(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights])


def step_case(runner: ModelRunner, batch: int) -> Callable[[], None]:
    runner.prefill(0, [[1] + [100 + i] * (POSITION - 1) for i in range(batch)], [False] * batch)
    return synced(lambda: runner.decode(0, [5] * batch, [POSITION] * batch))


def step_table(loaded: LoadedModel, batches: list[int], rounds: int) -> list[str]:
    runners = {kind: ModelRunner(loaded, max(batches), None, kind) for kind in ("fused", "hf")}
    lines = ["| batch | matmul floor ms | fused step ms | vs floor | HF-modules step ms |",
             "|---|---|---|---|---|"]
    for batch in batches:
        found = medians_ms({"floor": floor_case(loaded, batch),
                            **{kind: step_case(r, batch) for kind, r in runners.items()}}, rounds)
        lines.append(f"| {batch} | {found['floor']:.2f} | {found['fused']:.2f} | "
                     f"{found['fused'] / found['floor']:.2f}x | {found['hf']:.2f} |")
    return lines


def request(index: int, prompt: tuple[int, ...], name: str) -> EngineRequest:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return EngineRequest(str(index), prompt, params, Plain((LaneSpec(name, prompt),)))


def engine_run(loaded: LoadedModel, concurrency: int, prompt: tuple[int, ...]) -> float:
    """tok/s of `concurrency` requests of NEW_TOKENS each, all submitted at once."""
    engine = Engine(loaded, EngineConfig(max_num_seqs=concurrency))
    started = time.perf_counter()
    for i in range(concurrency):
        engine.submit(request(i, prompt, loaded.name), lambda _: None)
    while engine.has_work():
        engine.step()
    sync()
    return concurrency * NEW_TOKENS / (time.perf_counter() - started)


def hf_run(reference: torch.nn.Module, concurrency: int, prompt: tuple[int, ...]) -> float:
    """tok/s of HF generate over one static batch of the same prompts (greedy)."""
    ids = torch.tensor([prompt] * concurrency, device=reference.device)
    started = time.perf_counter()
    reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                       min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    sync()
    return concurrency * NEW_TOKENS / (time.perf_counter() - started)


def throughput_table(loaded: LoadedModel, reference: torch.nn.Module,
                     levels: list[int]) -> list[str]:
    prompt = tuple(range(100, 132))
    lines = ["| concurrency | steerserve engine tok/s | HF generate tok/s | ratio |",
             "|---|---|---|---|"]
    for level in levels:
        engine_run(loaded, level, prompt)  # warm-up: first use of each shape
        hf_run(reference, level, prompt)
        ours, theirs = engine_run(loaded, level, prompt), hf_run(reference, level, prompt)
        lines.append(f"| {level} | {ours:.0f} | {theirs:.0f} | {ours / theirs:.2f}x |")
    return lines


def engine_overhead(loaded: LoadedModel, rows: int, rounds: int) -> list[str]:
    """Engine.step in steady decoding against the bare forward over the same lanes."""
    engine = running_engine(loaded, rows)
    runner, lanes = engine.primary.runner, engine.primary.slots.lanes
    found = medians_ms({"engine step": synced(engine.step), "bare decode forward": synced(
        lambda: runner.decode(0, [5] * rows, [lane.cached_length for lane in lanes]))}, rounds)
    forward = found["bare decode forward"]
    return [f"| {rows} lanes, half top-p sampled | ms | vs the forward |", "|---|---|---|",
            *(f"| {name} | {ms:.2f} | {ms / forward:.2f}x |" for name, ms in found.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="HF config + tokenizer directory")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batches", default="1,8,32,64", help="decode batch sizes")
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run)")
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per case")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{name}, torch {torch.__version__}, {args.dtype}")
    loaded, reference = random_model(args.model_dir, getattr(torch, args.dtype), args.device)
    with torch.inference_mode():
        print("\n".join(step_table(loaded, batches, args.rounds)), flush=True)
        print("\n" + "\n".join(engine_overhead(loaded, max(batches), args.rounds)), flush=True)
        print("\n" + "\n".join(throughput_table(loaded, reference, batches)), flush=True)


if __name__ == "__main__":
    main()
