"""Applying a step's outcome: lanes advance, each request takes its token (stop rules,
detokenization, logprob records) and hears about it; finished requests are collected."""

from __future__ import annotations

from dataclasses import dataclass, field

from steerserve.decoding.engine.compute import RowOutcome, StepOutcome
from steerserve.decoding.engine.state import Sequence
from steerserve.decoding.model.forward import Results
from steerserve.decoding.model.hosted import HostedModel
from steerserve.decoding.request import Failure, FinishReason, RequestOutput, TokenLogprob
from steerserve.decoding.sampling.logprobs import TokenText, prompt_logprobs, token_logprob


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # prompt tokens prefilled, every lane counted
    cached_prompt_tokens: int = 0  # prompt tokens taken from the prefix cache instead
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    steps: int = 0


class Output:
    def __init__(self, models: dict[str, HostedModel], stats: EngineStats) -> None:
        self.models = models
        self.stats = stats
        self.token_text = {name: TokenText(h.info.tokenizer) for name, h in models.items()}

    def advance_lanes(self, results: Results) -> None:
        for lane in results:
            if lane.prefilled:
                lane.fed += 1
            else:
                lane.prefilled = True
                self.stats.prompt_tokens += len(lane.prompt_ids) - lane.from_cache
                self.stats.cached_prompt_tokens += lane.from_cache
                self.models[lane.spec.model].slots.remember_prefix(lane)

    def take(self, s: Sequence, row: RowOutcome, admitted: bool) -> None:
        """The request's token of this step (none when it only scores its prompt)."""
        text = self.token_text[s.request.model]
        scored = None
        if admitted and s.params.prompt_logprobs is not None:
            scored = prompt_logprobs(text, s.prompt_ids, row.prompt_rows,
                                     s.params.prompt_logprobs or 0)
        params = s.params
        if params.max_tokens == 0:  # scoring only (echo): no generated token
            s.finish_reason = FinishReason.LENGTH
            self.emit(s, (), (), scored)
            return
        record = None
        if row.logprob is not None:
            record = token_logprob(text, row.token, row.logprob, list(row.top_ids),
                                   list(row.top_logprobs))
        self._append(s, row.token)
        used = (row.temperature,) if params.report_temperatures else ()
        values = (row.method_value,) if row.method_value is not None else ()
        self.emit(s, (row.token,), (record,) if record else (), scored, temperatures=used,
                  method_values=values)

    def _append(self, s: Sequence, token: int) -> None:
        params = s.params
        s.output_ids.append(token)
        if s.history is not None:
            s.history.add(token)
        if s.grammar is not None:
            s.grammar.advance(token)
        self.stats.generation_tokens += 1
        if token in params.stop_token_ids or (token in s.eos_ids and not params.ignore_eos):
            s.finish_reason = FinishReason.STOP
        else:
            s.detokenizer.add_token(token)
            if s.detokenizer.stopped or (s.grammar is not None and s.grammar.done):
                s.finish_reason = FinishReason.STOP  # a complete grammar cannot go on
        at_limit = (len(s.output_ids) >= params.max_tokens
                    or s.longest_lane_tokens >= self._context_limit(s))
        if s.finish_reason is None and at_limit:
            s.finish_reason = FinishReason.LENGTH

    def _context_limit(self, s: Sequence) -> int:
        return min(self.models[lane.spec.model].info.max_model_len for lane in s.lanes)

    def emit(self, s: Sequence, tokens: tuple[int, ...], records: tuple[TokenLogprob, ...],
             scored: tuple[TokenLogprob, ...] | None, failure: Failure | None = None,
             temperatures: tuple[float, ...] = (),
             method_values: tuple[float, ...] = ()) -> None:
        text = s.detokenizer.release(final=s.finished) if failure is None else ""
        s.sink(RequestOutput(
            request_id=s.request_id, token_ids=tokens, text=text, logprobs=records,
            finished=s.finished, finish_reason=s.finish_reason,
            prompt_tokens=len(s.request.prompt_ids), completion_tokens=len(s.output_ids),
            prompt_logprobs=scored, failure=failure, temperatures=temperatures,
            method_values=method_values,
            reports=type(s.request.method).reports if method_values else None))

    def count_finished(self, s: Sequence) -> None:
        reason = s.finish_reason.value if s.finish_reason else "unknown"
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1


def rows_of(outcomes: list[StepOutcome]) -> list[tuple[Sequence, RowOutcome]]:
    return [(s, row) for outcome in outcomes for s, row in outcome.rows.items()]
