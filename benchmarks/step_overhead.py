#!/usr/bin/env python
"""Per-step cost of steering and adaptive temperature inside the engine, without HTTP noise.

    .venv/bin/python benchmarks/step_overhead.py [--threads 2]

On the embedded SmolLM2: the engine's own cost, a full `Engine.step` over 32 running lanes
(half greedy, half top-p sampled, some seeded) against the bare decode forward it contains;
a decode step over 32 lanes with no steering, then with every lane steered by its own vector
on layers 8-15 (and with head offsets on 3 heads), and with every lane editing its own feature
of the shipped SAE (examples/sae/smollm2-l15); and the sampler over 8 rows at a fixed
temperature, then under EDT, dynatemp and a learned head, beside the 8-lane decode step it
follows. Medians of repeated runs; the machine is shared, so the
end-to-end benchmarks (steering_bench.py, temperature_bench.py) carry more noise than these.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from steerserve.adapters.sae.autoencoder import SparseAutoencoder
from steerserve.adapters.sae.files import load_sae
from steerserve.adapters.steering.plan import decode_plan
from steerserve.adapters.steering.spec import (
    ApplyTo,
    FeatureEdit,
    SteerEdit,
    SteeringSpec,
    SteerMode,
    SteerTarget,
)
from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.methods.plain import Plain
from steerserve.decoding.model.loader import LoadedModel, load_model
from steerserve.decoding.model.runner import ModelRunner
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.adaptive import AdaptiveTemperature
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.decoding.sampling.sampler import RowState, sample
from steerserve.decoding.sampling.temperature_head import load_temperature_head

REPO = Path(__file__).resolve().parent.parent


def medians_ms(cases: dict, repeats: int) -> dict[str, float]:
    """Cases interleaved round by round, so drifting machine load hits each alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(repeats + 1):
        for name, work in cases.items():
            start = time.perf_counter()
            work()
            if round_index:  # the first round warms up
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def steering_specs(rows: int, hidden: int, heads: bool) -> list[SteeringSpec]:
    specs = []
    for i in range(rows):
        generator = torch.Generator().manual_seed(i)
        edits = [SteerEdit(layer, SteerTarget.RESIDUAL, torch.randn(hidden, generator=generator)
                           * 0.05, 1.0, SteerMode.ADD, False, ApplyTo.BOTH)
                 for layer in range(8, 16)]
        if heads:
            offsets = torch.zeros(9, 64)
            offsets[[1, 7]] = 0.01
            edits += [SteerEdit(4, SteerTarget.HEADS, offsets, 1.0, SteerMode.ADD, False,
                                ApplyTo.BOTH)]
        specs.append(SteeringSpec(tuple(edits)))
    return specs


def feature_specs(rows: int, sae: SparseAutoencoder) -> list[SteeringSpec]:
    """Every row its own SAE feature, alternately added and clamped."""
    return [SteeringSpec((), (FeatureEdit(
        sae.layer, (sae.name, i), sae.encoders[i], float(sae.enc_bias[i]),
        float(sae.threshold[i]), sae.decoders[i], i % 2 == 1, 4.0, ApplyTo.BOTH),))
        for i in range(rows)]


def steering_costs(runner: ModelRunner, hidden: int, repeats: int) -> dict[str, float]:
    rows = 32
    runner.prefill(0, [[1, 2, 3, 4, 5, 6, 7, 8]] * rows, [False] * rows)
    sae = load_sae("l15", REPO / "examples/sae/smollm2-l15", runner.device)
    plans = {"unsteered": None,
             "32 vectors x 8 layers": decode_plan(steering_specs(rows, hidden, False),
                                                  runner.device),
             "+ head offsets": decode_plan(steering_specs(rows, hidden, True), runner.device),
             "32 SAE features (one per row)": decode_plan(feature_specs(rows, sae),
                                                          runner.device)}
    return medians_ms({name: (lambda p=plan: runner.decode(0, [5] * rows, [8] * rows, None, p))
                       for name, plan in plans.items()}, repeats)


def running_engine(loaded: LoadedModel, rows: int) -> Engine:
    """An engine with `rows` endless requests, every one past its prefill: half greedy, half
    top-p sampled, some seeded."""
    prompt = tuple(range(10, 42))
    engine = Engine(loaded, EngineConfig(max_num_seqs=rows))
    for i in range(rows):
        params = SamplingParams(max_tokens=10_000, temperature=0.0 if i % 2 else 0.8,
                                top_p=0.95, seed=i if i % 4 == 0 else None, ignore_eos=True)
        engine.submit(EngineRequest(str(i), prompt, params, Plain((LaneSpec(loaded.name,
                                                                            prompt),))),
                      lambda _: None)
    while engine.num_waiting or len(engine.primary.slots.lanes) < rows:
        engine.step()  # the prefills, a budget of prompt tokens a step
    engine.step()  # every lane decoding
    return engine


def engine_costs(loaded: LoadedModel, repeats: int) -> dict[str, float]:
    """Engine.step in steady decoding vs the bare forward over the same 32 lanes."""
    rows = 32
    engine = running_engine(loaded, rows)
    runner, lanes = engine.primary.runner, engine.primary.slots.lanes
    return medians_ms({"engine step": engine.step, "bare decode forward": lambda: runner.decode(
        0, [5] * rows, [lane.cached_length for lane in lanes])}, repeats)


def temperature_costs(runner: ModelRunner, repeats: int) -> dict[str, float]:
    rows = 8
    runner.prefill(0, [[1, 2, 3, 4, 5, 6, 7, 8]] * rows, [False] * rows)
    out = runner.decode(0, [5] * rows, [8] * rows)
    head = load_temperature_head(REPO / "examples/heads/smollm2-temperature.safetensors", 576)
    rules = {"fixed 0.8": None, "edt": AdaptiveTemperature("edt", t0=0.8),
             "dynatemp": AdaptiveTemperature("dynatemp", t0=0.8, range=0.5),
             "learned head": AdaptiveTemperature("learned", head=head)}
    cases = {"decode step (8 lanes)": lambda: runner.decode(0, [5] * rows, [8] * rows)}
    for name, rule in rules.items():
        def step(rule=rule):
            given = [None] * rows
            if rule is not None and rule.method == "learned":  # one batch, as the engine does
                given = rule.head.choose(out.hidden, True)[1].tolist()
            states = [RowState(SamplingParams(temperature=0.8, top_p=0.95, adaptive=rule),
                               given_temperature=given[i]) for i in range(rows)]
            sample(out.logits.clone(), states)

        cases[f"sampler: {name}"] = step
    return medians_ms(cases, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("SmolLM2-135M-Instruct", dtype="float32", max_model_len=512)
    with torch.inference_mode():
        engine = engine_costs(loaded, args.repeats)
        runner = ModelRunner(loaded, 32)
        steering = steering_costs(runner, loaded.model.config.hidden_size, args.repeats)
        temperature = temperature_costs(runner, args.repeats)
    forward = engine["bare decode forward"]
    print("| 32 running lanes | ms | vs the forward |\n|---|---|---|")
    for name, ms in engine.items():
        print(f"| {name} | {ms:.1f} | {ms / forward:.3f}x |")
    print()
    print("| decode step, 32 lanes | ms | vs unsteered |\n|---|---|---|")
    for name, ms in steering.items():
        print(f"| {name} | {ms:.1f} | {ms / steering['unsteered']:.3f}x |")
    step = temperature.pop("decode step (8 lanes)")
    fixed = temperature["sampler: fixed 0.8"]
    print(f"\n| 8 rows (decode step {step:.1f} ms) | sampler ms | step + sampler vs fixed |")
    print("|---|---|---|")
    for name, ms in temperature.items():
        print(f"| {name} | {ms:.2f} | {(step + ms) / (step + fixed):.3f}x |")


if __name__ == "__main__":
    main()
