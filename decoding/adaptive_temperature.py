"""Adaptive temperature: a request's rule, and the learned head's choices per step.

Rules (the kernel in `kernels/adaptive_temperature.py` computes them per row):
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

from kernels.adaptive_temperature import TempMethod

if TYPE_CHECKING:
    from decoding.temperature_head import TemperatureHead


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


def head_temperature(adaptive: AdaptiveTemperature, hidden: torch.Tensor,
                     generator: torch.Generator | None) -> float:
    """The learned head's temperature for one row's final hidden state (C,)."""
    _, temperatures = adaptive.head.choose(hidden.unsqueeze(0).float(),
                                           greedy=adaptive.choice == "greedy",
                                           generator=generator)
    return float(temperatures[0])
