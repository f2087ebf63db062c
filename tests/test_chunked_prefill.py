"""Chunked prefill: a prompt longer than the prefill budget is prefilled a chunk per step while
running requests keep decoding, and generates exactly what one whole prefill generates (HF
generate on an untouched model, or the same engine without chunks, is the oracle)."""

from __future__ import annotations

import pytest
import torch

from steerserve.adapters.steering.spec import (
    ApplyTo,
    SteerEdit,
    SteeringSpec,
    SteerMode,
    SteerTarget,
)
from steerserve.decoding.methods.dola import DoLa
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, hf_greedy, run_to_completion
from tests.support import make_engine

BUDGET = 8
LONG = [1] + [(7 * i) % 90 + 3 for i in range(40)]  # 41 tokens: five chunks and a last token
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def steering() -> SteeringSpec:
    """Edits at block 0, so that the keys of block 1 carry them."""
    torch.manual_seed(0)
    prompt_edit = SteerEdit(0, SteerTarget.RESIDUAL, torch.randn(64), 1.5, SteerMode.ADD, False,
                            ApplyTo.BOTH)
    generated_edit = SteerEdit(0, SteerTarget.RESIDUAL, torch.randn(64), 2.0, SteerMode.ADD,
                               False, ApplyTo.GENERATION)
    return SteeringSpec((prompt_edit, generated_edit))


@pytest.mark.parametrize("forward", ["fused", "hf"])
def test_a_chunked_prompt_generates_as_one_prefill(llama, llama_reference, forward):
    engine = make_engine(llama, forward=forward, max_prefill_tokens=BUDGET)
    collector = Collector()
    collector.submit(engine, "long", LONG, GREEDY)
    run_to_completion(engine)
    assert collector.tokens("long") == hf_greedy(llama_reference, LONG, 6)
    assert engine.stats.prompt_tokens == len(LONG)


def test_running_streams_get_a_token_every_step_while_a_long_prompt_warms(llama):
    engine = make_engine(llama, max_prefill_tokens=BUDGET)
    collector = Collector()
    collector.submit(engine, "short", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0.0,
                                                                ignore_eos=True))
    engine.step()
    collector.submit(engine, "long", LONG, GREEDY)
    for step in range(1, 6):  # five chunks of 8 tokens
        engine.step()
        assert len(collector.tokens("short")) == 1 + step
        assert collector.tokens("long") == []
    engine.step()  # the last token joins as an ordinary prefill
    assert len(collector.tokens("short")) == 7 and len(collector.tokens("long")) == 1
    run_to_completion(engine)
    alone = make_engine(llama)
    reference = Collector()
    reference.submit(alone, "long", LONG, GREEDY)
    run_to_completion(alone)
    assert collector.tokens("long") == reference.tokens("long")


@pytest.mark.parametrize("kind", ["steered", "dola", "seeded"])
def test_chunks_leave_steering_methods_and_sampling_unchanged(llama, kind):
    def run(budget: int) -> list[int]:
        engine = make_engine(llama, max_prefill_tokens=budget)
        lane = LaneSpec(engine.primary.name, tuple(LONG), None,
                        steering() if kind == "steered" else None)
        params = GREEDY
        if kind == "seeded":
            params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
        method = DoLa((lane,), layers=(0,), relative_top=0.1) if kind == "dola" else None
        collector = Collector()
        if method is None:
            collector.submit(engine, "r", LONG, params, steering=lane.steering)
        else:
            collector.submit_request(engine, EngineRequest("r", tuple(LONG), params, method))
        run_to_completion(engine)
        assert collector.last("r").failure is None
        return collector.tokens("r")

    assert run(BUDGET) == run(4096)


def test_a_scored_prompt_is_chunked_and_its_logprobs_exact(llama, llama_reference):
    """echo + logprobs: a long scored prompt no longer stalls running streams (a chunk a
    step, each chunk's logits kept), and every position's logprob is HF's."""
    engine = make_engine(llama, max_prefill_tokens=BUDGET)
    collector = Collector()
    collector.submit(engine, "short", [1, 2, 3], SamplingParams(max_tokens=20, temperature=0.0,
                                                                ignore_eos=True))
    engine.step()
    collector.submit(engine, "scored", LONG, SamplingParams(max_tokens=0, prompt_logprobs=2))
    for step in range(1, 6):  # five chunks of 8 tokens, the stream going on
        engine.step()
        assert len(collector.tokens("short")) == 1 + step
        assert [s.request_id for s in engine.scheduler.warming] == ["scored"]
    run_to_completion(engine)
    scored = collector.last("scored").prompt_logprobs
    assert len(scored) == len(LONG) and all(len(s.top) == 2 for s in scored[1:])
    with torch.no_grad():
        ids = torch.tensor([LONG], device=llama_reference.device)
        logprobs = llama_reference(ids).logits[0].float().log_softmax(-1)
    for position in range(1, len(LONG)):
        expected = float(logprobs[position - 1, LONG[position]])
        assert scored[position].logprob == pytest.approx(expected, abs=1e-4)


def test_aborting_a_warming_request_frees_its_slots(llama, llama_reference):
    engine = make_engine(llama, max_prefill_tokens=BUDGET, max_num_seqs=1)
    collector = Collector()
    collector.submit(engine, "gone", LONG, GREEDY)
    engine.step()
    engine.step()
    engine.abort("gone")
    collector.submit(engine, "next", LONG[:30], GREEDY)
    run_to_completion(engine)
    assert collector.last("gone").finish_reason.value == "abort"
    assert collector.tokens("gone") == []
    assert collector.tokens("next") == hf_greedy(llama_reference, LONG[:30], 6)
    assert engine.num_running == 0


def test_a_chunked_multi_lane_score_equals_the_whole_one(llama):
    """Logit arithmetic over a plain and a steered lane, scored: chunked (budget 8) and in one
    prefill give the same prompt logprobs."""
    from steerserve.decoding.methods.logit_arithmetic import LogitArithmetic

    def scored(budget: int):
        engine = make_engine(llama, max_prefill_tokens=budget)
        name, prompt = engine.primary.name, tuple(LONG)
        method = LogitArithmetic((LaneSpec(name, prompt), LaneSpec(name, prompt, None,
                                                                   steering())), (1.5, -0.5))
        collector = Collector()
        collector.submit_request(engine, EngineRequest(
            "r", prompt, SamplingParams(max_tokens=0, prompt_logprobs=1), method))
        engine.step()
        assert len(engine.scheduler.warming) == (1 if budget == BUDGET else 0)
        run_to_completion(engine)
        return collector.last("r").prompt_logprobs

    chunked, whole = scored(BUDGET), scored(4096)
    assert [s.token_id for s in chunked] == [s.token_id for s in whole]
    for mine, theirs in zip(chunked[1:], whole[1:], strict=True):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
