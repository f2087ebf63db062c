"""Activation steering in the engine: against repeng's ControlModel, hand-built references for
ablate/clamp/heads, and heterogeneous batches equal to each request run alone."""

from __future__ import annotations

import copy

import pytest
import torch
from repeng import ControlModel, ControlVector

from steerserve.adapters.steering.plan import prefill_plan
from steerserve.adapters.steering.spec import (
    ApplyTo,
    SteerEdit,
    SteeringSpec,
    SteerMode,
    SteerTarget,
)
from steerserve.decoding.model.capture import Capture
from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, hf_greedy, run_to_completion
from tests.support import make_engine
from tests.tiny_models import tiny_llama

PROMPTS = [[1, 5, 9, 13, 4, 22], [1, 7, 3], [1, 30, 31, 32, 33, 34, 35, 36, 12], [1, 18, 2, 6]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def residual(layer: int, vector: torch.Tensor, scale: float = 1.0, mode: SteerMode = SteerMode.ADD,
             normalize: bool = False, apply_to: ApplyTo = ApplyTo.BOTH) -> SteerEdit:
    return SteerEdit(layer, SteerTarget.RESIDUAL, vector.float(), scale, mode, normalize,
                     apply_to)


def heads(layer: int, offsets: torch.Tensor, scale: float = 1.0,
          apply_to: ApplyTo = ApplyTo.BOTH) -> SteerEdit:
    return SteerEdit(layer, SteerTarget.HEADS, offsets.float(), scale, SteerMode.ADD, False,
                     apply_to)


@pytest.fixture(scope="module")
def model_pair(tokenizer):
    """A fresh tiny Llama for the engine and an identical copy for the references."""
    model = tiny_llama(len(tokenizer), seed=3)
    return from_pretrained_objects(model, tokenizer, "tiny-steer"), copy.deepcopy(model)


@pytest.fixture(scope="module")
def directions():
    gen = torch.Generator().manual_seed(11)
    return {layer: torch.randn(64, generator=gen) * 2 for layer in (0, 1)}


def submit(engine, collector: Collector, request_id: str, prompt, spec, params=GREEDY) -> None:
    collector.submit(engine, request_id, prompt, params, steering=spec)


def generate(engine, prompt, spec, params=GREEDY) -> list[int]:
    collector = Collector()
    submit(engine, collector, "r", prompt, spec, params)
    run_to_completion(engine)
    return collector.tokens("r")


@pytest.mark.parametrize("forward", ["fused", "hf"])
@pytest.mark.parametrize("normalize", [False, True])
def test_greedy_equals_repeng_control_model(model_pair, directions, normalize, forward):
    loaded, reference = model_pair
    scale = 1.5
    control = ControlModel(copy.deepcopy(reference), [0, 1])
    vector = ControlVector("llama", {k: v.numpy() for k, v in directions.items()})
    control.set_control(vector, scale, normalize=normalize)
    spec = SteeringSpec(tuple(residual(layer, v, scale, normalize=normalize)
                              for layer, v in directions.items()))
    engine = make_engine(loaded, forward=forward)
    for prompt in PROMPTS[:2]:
        expected = hf_greedy(control.model, prompt, GREEDY.max_tokens)
        assert generate(engine, prompt, spec) == expected
    assert generate(engine, PROMPTS[0], spec) != hf_greedy(reference, PROMPTS[0], 8)


def test_prompt_logits_equal_repeng(model_pair, directions):
    loaded, reference = model_pair
    control = ControlModel(copy.deepcopy(reference), [1])
    control.set_control(ControlVector("llama", {1: directions[1].numpy()}), -0.7)
    spec = SteeringSpec((residual(1, directions[1], -0.7),))
    runner = make_engine(loaded).primary.runner
    prompt = PROMPTS[2]
    plan = prefill_plan([spec], [len(prompt)], len(prompt), loaded.device)
    got = runner.prefill(0, [prompt], [True], None, plan)
    with torch.inference_mode():
        expected = control.model(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(got.prompt_logits[0], expected[:-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.last_logits[0], expected[-1], rtol=1e-4, atol=1e-4)


def _hooked_reference(reference, layer: int, edit):
    """A plain HF model whose block `layer` output goes through `edit(hidden)`."""
    model = copy.deepcopy(reference)
    model.model.layers[layer].register_forward_hook(lambda m, a, out: edit(out))
    return model


@pytest.mark.parametrize("forward", ["fused", "hf"])
def test_ablate_and_clamp_equal_projection_reference(model_pair, directions, forward):
    loaded, reference = model_pair
    v = directions[0]
    u = v / v.norm()
    engine = make_engine(loaded, forward=forward)
    for mode, value in ((SteerMode.ABLATE, 0.0), (SteerMode.CLAMP, 3.0)):
        def project(h, value=value):
            return h - (h @ u).unsqueeze(-1) * u + value * u
        model = _hooked_reference(reference, 0, project)
        spec = SteeringSpec((residual(0, v, value, mode),))
        assert generate(engine, PROMPTS[0], spec) == hf_greedy(model, PROMPTS[0], 8)


@pytest.mark.parametrize("forward", ["fused", "hf"])
def test_head_offsets_equal_o_proj_input_reference(model_pair, forward):
    loaded, reference = model_pair
    offsets = torch.zeros(4, 16)
    offsets[2] = torch.linspace(-3, 3, 16)  # head 2 of layer 1 only
    model = copy.deepcopy(reference)
    model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda m, args: (args[0] + 2.0 * offsets.reshape(-1),))
    spec = SteeringSpec((heads(1, offsets, 2.0),))
    engine = make_engine(loaded, forward=forward)
    expected = hf_greedy(model, PROMPTS[1], 8)
    assert generate(engine, PROMPTS[1], spec) == expected
    assert expected != hf_greedy(reference, PROMPTS[1], 8)


def test_mixed_batch_equals_each_alone(model_pair, directions):
    loaded, _ = model_pair
    v0, v1 = directions[0], directions[1]
    head_offsets = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    specs = [
        SteeringSpec((residual(0, v0, 2.0), residual(1, v1, -1.0, SteerMode.ABLATE))),
        None,
        SteeringSpec((residual(1, v1, 4.0, SteerMode.CLAMP, normalize=True),
                      heads(0, head_offsets, 0.5))),
        SteeringSpec((residual(0, v1, 3.0, apply_to=ApplyTo.PROMPT),
                      residual(1, v0, 1.0, apply_to=ApplyTo.GENERATION))),
    ]
    engine = make_engine(loaded)
    alone = [generate(engine, p, s) for p, s in zip(PROMPTS, specs, strict=True)]
    collector = Collector()
    for i, (prompt, spec) in enumerate(zip(PROMPTS, specs, strict=True)):
        submit(engine, collector, f"r{i}", prompt, spec)
    run_to_completion(engine)
    assert [collector.tokens(f"r{i}") for i in range(4)] == alone
    # and joining mid-flight: two steered requests arrive while others decode
    collector = Collector()
    submit(engine, collector, "a", PROMPTS[0], specs[0])
    submit(engine, collector, "b", PROMPTS[1], None)
    engine.step()
    engine.step()
    submit(engine, collector, "c", PROMPTS[2], specs[2])
    submit(engine, collector, "d", PROMPTS[3], specs[3])
    run_to_completion(engine)
    assert [collector.tokens(x) for x in "abcd"] == alone


def test_apply_to_selects_positions(model_pair, directions):
    loaded, _ = model_pair
    engine = make_engine(loaded)
    v = directions[0]  # layer 0: prompt positions feed later positions through layer 1
    outputs = {where: generate(engine, PROMPTS[0], SteeringSpec((residual(0, v, apply_to=where),)))
               for where in ApplyTo}
    plain = generate(engine, PROMPTS[0], None)
    assert outputs[ApplyTo.PROMPT] != plain
    assert outputs[ApplyTo.GENERATION] != plain
    assert outputs[ApplyTo.BOTH] != outputs[ApplyTo.PROMPT]
    # generation-only changes nothing before the last prompt position: same prompt logits
    runner = engine.primary.runner
    prompt = PROMPTS[0]
    spec = SteeringSpec((residual(0, v, apply_to=ApplyTo.GENERATION),))
    plan = prefill_plan([spec], [len(prompt)], len(prompt), loaded.device)
    steered = runner.prefill(0, [prompt], [True], None, plan)
    unsteered = runner.prefill(0, [prompt], [True], None, None)
    torch.testing.assert_close(steered.prompt_logits[0], unsteered.prompt_logits[0])
    assert not torch.allclose(steered.last_logits, unsteered.last_logits)


def test_unsteered_batch_has_no_plan_and_equals_hf(model_pair):
    loaded, reference = model_pair
    engine = make_engine(loaded)
    assert engine.primary.steering_for_decode([]) is None
    assert generate(engine, PROMPTS[2], None) == hf_greedy(reference, PROMPTS[2], 8)


def test_capture_reads_block_outputs(model_pair):
    loaded, reference = model_pair
    runner = make_engine(loaded).primary.runner
    prompts = [PROMPTS[0], PROMPTS[1]]
    capture = Capture(frozenset({0}), SteerTarget.RESIDUAL, torch.tensor([5, 2]))
    runner.capture(prompts, capture)
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):
            out = reference(torch.tensor([prompt]), output_hidden_states=True)
            expected = out.hidden_states[1][0, len(prompt) - 1]
            torch.testing.assert_close(capture.found[0][row], expected, rtol=1e-4, atol=1e-5)
