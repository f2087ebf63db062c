"""Drive a real Engine synchronously (no thread) and collect what it reports."""

from __future__ import annotations

from collections import defaultdict

import torch

from steerserve.decoding.engine.core import Engine
from steerserve.decoding.request import GenerationRequest, RequestOutput
from steerserve.decoding.sampling.params import SamplingParams


class Collector:
    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = defaultdict(list)

    def submit(self, engine: Engine, request_id: str, prompt: list[int],
               params: SamplingParams, adapter=None) -> None:
        engine.submit(GenerationRequest(request_id, tuple(prompt), params,
                                        self.outputs[request_id].append, adapter))

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
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
