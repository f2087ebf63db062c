"""One step's computation for a set of running requests: forwards per hosted model, late lanes,
combination, sampling. It leaves request and lane state as it found it (apart from creating a
method's late lanes once), so a step that raised can be computed again for fewer requests;
`output.commit` applies the outcome."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerserve.decoding.engine.late_lanes import late_lanes
from steerserve.decoding.engine.state import Sequence
from steerserve.decoding.engine.view import StepView
from steerserve.decoding.methods.combination import next_token_rows, prompt_rows
from steerserve.decoding.model import forward
from steerserve.decoding.model.forward import Results
from steerserve.decoding.model.hosted import HostedModel
from steerserve.decoding.model.slot_table import Lane
from steerserve.decoding.sampling.adaptive import head_choices
from steerserve.decoding.sampling.grammar import grammar_mask
from steerserve.decoding.sampling.sampler import RowState, sample


@dataclass(frozen=True)
class RowOutcome:
    """What one request gets from the step."""

    token: int
    temperature: float
    logprob: float | None = None
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()
    prompt_rows: torch.Tensor | None = None  # (P - 1, V) scoring rows, at admission
    method_value: float | None = None  # the method's number for this token, when reported


@dataclass
class StepOutcome:
    results: Results  # every lane that ran, with what its forward returned
    rows: dict[Sequence, RowOutcome]


class StepComputer:
    def __init__(self, models: dict[str, HostedModel]) -> None:
        self.models = models

    def early_exits(self, model: str, hidden: torch.Tensor) -> torch.Tensor:
        return self.models[model].runner.early_exit_logits(hidden)

    def __call__(self, requests: list[Sequence], admitted: list[Sequence]) -> StepOutcome:
        results = self._forward(requests, lambda s: s.unique_lanes)
        joining = [s for s in requests if s in admitted]
        results.update(self._forward(joining, lambda s: [
            late for late in late_lanes(self.models, s, StepView(s, results))
            if late not in results]))  # a step computed again already prefilled them
        views = [StepView(s, results) for s in requests]
        return StepOutcome(results, self._sample(requests, views, joining))

    def _forward(self, requests: list[Sequence], lanes_of) -> Results:
        by_model: dict[str, list[Lane]] = {}
        feed: dict[Lane, int] = {}
        for s in requests:
            for lane in lanes_of(s):
                by_model.setdefault(lane.spec.model, []).append(lane)
                if lane.prefilled:
                    feed[lane] = s.output_ids[lane.fed]
        results: Results = {}
        for name, lanes in by_model.items():
            results.update(forward.run(self.models[name], lanes, feed))
        return results

    def _sample(self, requests: list[Sequence], views: list[StepView],
                joining: list[Sequence]) -> dict[Sequence, RowOutcome]:
        members = [(s.request.method, view) for s, view in zip(requests, views, strict=True)]
        width = max(self.models[s.request.model].info.vocab_size for s in requests)
        logits = next_token_rows(members, self.early_exits, width)
        given = head_choices(requests, [view.hidden(0) for view in views], joining)
        grammar = grammar_mask([s.grammar for s in requests], width, logits.device)
        result = sample(logits, [RowState(s.params, s.history, s.generator, t)
                                 for s, t in zip(requests, given, strict=True)], grammar)
        tokens, temperatures = result.tokens.tolist(), result.temperatures.tolist()
        chosen = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        rows = {}
        for row, (s, view) in enumerate(zip(requests, views, strict=True)):
            k = s.params.logprobs or 0
            rows[s] = RowOutcome(
                tokens[row], temperatures[row],
                chosen[row] if chosen is not None and s.params.logprobs is not None else None,
                tuple(top_ids[row][:k]) if top_ids and k else (),
                tuple(top_values[row][:k]) if top_values and k else (),
                self._scores(s, view) if s in joining else None,
                s.request.method.token_value(view))
        return rows

    def _scores(self, s: Sequence, view: StepView) -> torch.Tensor | None:
        if s.params.prompt_logprobs is None:
            return None
        return prompt_rows(s.request.method, view, len(s.request.prompt_ids) - 1,
                           self.early_exits)

