"""The prefix cache: prompts that start like a recent one prefill only the rest, and decode
exactly as without it (HF generate on an untouched model is the oracle)."""

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
from steerserve.decoding.model.prefix_cache import MIN_REUSE, common_prefix
from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, hf_greedy, run_to_completion
from tests.support import make_engine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SHARED = [1] + list(range(40, 70))  # a 31-token "system prompt"
PROMPTS = [SHARED + [7, 8, 9], SHARED + [100, 101, 102, 103, 104], SHARED[:20] + [5, 6],
           [1, 2, 3, 4]]


def test_common_prefix():
    assert common_prefix((1, 2, 3, 4), (1, 2, 9)) == 2
    assert common_prefix((), (1,)) == 0 and common_prefix((5, 6), (5, 6)) == 2


@pytest.mark.parametrize("forward", ["fused", "hf"])
def test_prompts_sharing_a_prefix_decode_as_without_it(llama, llama_reference, forward):
    engine = make_engine(llama, forward=forward, prefix_cache_slots=2)
    collector = Collector()
    collector.submit(engine, "first", PROMPTS[0], GREEDY)
    run_to_completion(engine)  # its prompt is now cached
    for i, prompt in enumerate(PROMPTS[1:], start=1):  # one prefill, rows starting apart
        collector.submit(engine, str(i), prompt, GREEDY)
    run_to_completion(engine)
    assert collector.tokens("first") == hf_greedy(llama_reference, PROMPTS[0], 8)
    for i, prompt in enumerate(PROMPTS[1:], start=1):
        assert collector.tokens(str(i)) == hf_greedy(llama_reference, prompt, 8), i
    # 31 tokens for the second, 20 for the third; the last shares too little (< MIN_REUSE)
    assert engine.stats.cached_prompt_tokens == len(SHARED) + 20
    assert engine.stats.prompt_tokens == sum(map(len, PROMPTS)) - len(SHARED) - 20


def test_only_lanes_whose_keys_are_their_tokens_reuse(llama, llama_reference):
    engine = make_engine(llama, prefix_cache_slots=2)
    collector = Collector()
    collector.submit(engine, "warm", PROMPTS[0], GREEDY)
    run_to_completion(engine)
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=0)
    collector.submit(engine, "scored", PROMPTS[1], scoring)  # needs every position's logits
    vector = torch.ones(64)
    steering = SteeringSpec((SteerEdit(0, SteerTarget.RESIDUAL, vector, 2.0, SteerMode.ADD,
                                       False, ApplyTo.BOTH),))
    collector.submit(engine, "steered", PROMPTS[1], GREEDY, steering=steering)
    run_to_completion(engine)
    assert engine.stats.cached_prompt_tokens == 0
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[1]], device=llama_reference.device)
        logprobs = llama_reference(ids).logits[0].float().log_softmax(-1)
    scored = collector.last("scored").prompt_logprobs
    for position in range(1, len(PROMPTS[1])):
        expected = float(logprobs[position - 1, PROMPTS[1][position]])
        assert scored[position].logprob == pytest.approx(expected, abs=1e-4)


def test_short_prefixes_are_not_worth_it(llama):
    engine = make_engine(llama, prefix_cache_slots=1)
    collector = Collector()
    short = list(range(1, MIN_REUSE))  # no longer than MIN_REUSE: not kept
    collector.submit(engine, "a", short + [3], GREEDY)
    run_to_completion(engine)
    collector.submit(engine, "b", short + [4], GREEDY)
    run_to_completion(engine)
    assert engine.stats.cached_prompt_tokens == 0
