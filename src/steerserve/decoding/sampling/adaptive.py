"""Adaptive temperature: a request's rule, and the learned head's choices per step.

Rules (the kernel in `kernels/adaptive_temperature/` computes them per row):
* `edt` (Zhang et al. 2024): T = t0 * n ** (theta / H), H the entropy of the row's
  distribution after bias and penalties (full vocabulary);
* `dynatemp` (llama.cpp): T = Tmin + (Tmax - Tmin) * (H / ln(candidates)) ** exponent over
  the tokens that survive top-k / top-p / min-p, which (as in llama.cpp's sampler chain) run
  before the temperature for these rows;
* `learned` (ADAPTIVEDECODER): a head on the final hidden state picks T from its set, per
  token or once per response (`sequence`: from the last prompt position).
T = 0 means greedy for that token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from steerserve.kernels.adaptive_temperature.ops import TempMethod

if TYPE_CHECKING:
    from steerserve.decoding.engine.state import Sequence
    from steerserve.decoding.sampling.temperature_head import TemperatureHead


@dataclass(frozen=True, eq=False)
class AdaptiveTemperature:
    method: str  # "edt" | "dynatemp" | "learned"
    t0: float = 1.0  # edt: T0; dynatemp: the centre temperature
    theta: float = 1.0  # edt
    n: float = 0.8  # edt
    range: float = 0.0  # dynatemp
    exponent: float = 1.0  # dynatemp
    head: TemperatureHead | None = None  # learned
    level: str = "token"  # learned: "token" or "sequence"
    choice: str = "greedy"  # learned: "greedy" (argmax of the head) or "sample"

    @property
    def kernel_method(self) -> TempMethod:
        return {"edt": TempMethod.EDT, "dynatemp": TempMethod.DYNATEMP}.get(
            self.method, TempMethod.GIVEN)

    @property
    def kernel_params(self) -> tuple[float, float]:
        """(param_a, param_b) of the kernel."""
        if self.method == "edt":
            return self.theta, self.n
        if self.method == "dynatemp":
            return self.range, self.exponent
        return 0.0, 0.0


def head_choices(running: list[Sequence], hidden: list[torch.Tensor],
                 admitted: list[Sequence]) -> list[float | None]:
    """Each request's temperature from its learned head this step (None: no head). Per token,
    or once per response from the last prompt position (level 'sequence'); the head reads
    `hidden[row]`, the final hidden state of the request's first lane. Greedy choices of one
    head run as one batch; sampled ones draw from each request's own generator."""
    given: list[float | None] = [None] * len(running)
    batches: dict[int, list[int]] = {}
    for row, s in enumerate(running):
        rule = s.params.adaptive
        if rule is None or rule.method != "learned":
            continue
        if rule.level == "sequence" and s not in admitted:
            given[row] = s.sequence_temperature
        elif rule.choice == "greedy":
            batches.setdefault(id(rule.head), []).append(row)
        else:
            given[row] = _choose(rule.head, [hidden[row]], False, s.generator)[0]
    for rows in batches.values():
        head = running[rows[0]].params.adaptive.head
        for row, t in zip(rows, _choose(head, [hidden[r] for r in rows], True, None),
                          strict=True):
            given[row] = t
    for row, s in enumerate(running):
        if s in admitted and given[row] is not None:
            s.sequence_temperature = given[row]
    return given


def _choose(head: TemperatureHead, hidden: list[torch.Tensor], greedy: bool,
            generator: torch.Generator | None) -> list[float]:
    states = torch.stack(hidden).float()  # (N, C)
    return head.choose(states, greedy=greedy, generator=generator)[1].tolist()
