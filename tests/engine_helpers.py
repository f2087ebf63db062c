"""Drive a real Engine synchronously (no thread) and collect what it reports."""

from __future__ import annotations

from collections import defaultdict

import torch

from steerserve.adapters.steering.spec import SteeringSpec
from steerserve.decoding.engine.core import Engine
from steerserve.decoding.methods.plain import Plain
from steerserve.decoding.request import EngineRequest, LaneSpec, RequestOutput
from steerserve.decoding.sampling.params import SamplingParams


def plain_request(engine: Engine, request_id: str, prompt: list[int], params: SamplingParams,
                  adapter=None, steering: SteeringSpec | None = None) -> EngineRequest:
    """One lane on the engine's first model, as the server builds a request without a method."""
    lane = LaneSpec(engine.primary.name, tuple(prompt), adapter, steering)
    return EngineRequest(request_id, tuple(prompt), params, Plain((lane,)))


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = defaultdict(list)

    def submit(self, engine: Engine, request_id: str, prompt: list[int],
               params: SamplingParams, adapter=None, steering: SteeringSpec | None = None
               ) -> None:
        self.submit_request(engine, plain_request(engine, request_id, prompt, params, adapter,
                                                  steering))

    def submit_request(self, engine: Engine, request: EngineRequest) -> None:
        engine.submit(request, self.outputs[request.request_id].append)

    def tokens(self, request_id: str) -> list[int]:
        return [t for o in self.outputs[request_id] for t in o.token_ids]

    def text(self, request_id: str) -> str:
        return "".join(o.text for o in self.outputs[request_id])

    def last(self, request_id: str) -> RequestOutput:
        return self.outputs[request_id][-1]


def run_to_completion(engine: Engine, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not finish")


def generate_alone(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    collector = Collector()
    collector.submit(engine, "alone", prompt, params)
    run_to_completion(engine)
    return collector.tokens("alone")


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens from HF `generate` on a model the engine never touched."""
    if getattr(model, "_steerserve_taken", False):
        raise AssertionError("the oracle must be an untouched copy, not the engine's model")
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
