"""Per-request sampling parameters, as the engine sees them (already validated by the server)."""

from __future__ import annotations

from dataclasses import dataclass

from steerserve.decoding.sampling.adaptive import AdaptiveTemperature
from steerserve.decoding.sampling.grammar import Grammar

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # distinct token ids
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None = off; else number of top alternatives (0..20)
    prompt_logprobs: int | None = None  # echo scoring: logprobs of the prompt's own tokens
    skip_special_tokens: bool = True
    adaptive: AdaptiveTemperature | None = None  # the temperature rule, when not fixed
    report_temperatures: bool = False  # return the temperature used for each token
    grammar: Grammar | None = None  # structured output: the tokens allowed follow it

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 and self.adaptive is None

    @property
    def truncates(self) -> bool:
        """Whether top-k, top-p or min-p filtering is active."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def penalizes(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)
