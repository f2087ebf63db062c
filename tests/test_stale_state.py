"""No state a request leaves behind changes another's output: a reused KV slot after a
steering request that drove its activations to the edge of the float range."""

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
from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, run_to_completion
from tests.support import make_engine
from tests.tiny_models import tiny_llama

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def blow_up(hidden: int, scale: float) -> SteeringSpec:
    vector = torch.full((hidden,), 3.0)
    return SteeringSpec((SteerEdit(0, SteerTarget.RESIDUAL, vector, scale, SteerMode.ADD,
                                   False, ApplyTo.BOTH),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_reused_slot_holds_nothing_of_the_previous_lane(tokenizer, dtype):
    model = tiny_llama(len(tokenizer)).to(dtype)
    loaded = from_pretrained_objects(model, tokenizer, "tiny")
    engine = make_engine(loaded, max_num_seqs=2)
    short, long = [1, 5, 9], list(range(20, 40))
    collector = Collector()
    collector.submit(engine, "alone", short, GREEDY)
    run_to_completion(engine)
    expected = collector.tokens("alone")
    # A finite JSON number, past the float32 range: the steered lane's keys and values
    # become non-finite in its slot (in any dtype).
    collector.submit(engine, "steered", list(range(50, 75)), GREEDY, steering=blow_up(64, 1e300))
    run_to_completion(engine)
    # The short request takes the steered one's slot; the long one makes every decode read
    # the short one's slot well past its own length (masked, but read).
    collector.submit(engine, "short", short, GREEDY)
    collector.submit(engine, "long", long, GREEDY)
    run_to_completion(engine)
    assert collector.tokens("short") == expected
