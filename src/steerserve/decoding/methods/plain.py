"""Plain decoding: one lane, its logits as they are. Every request without a method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from steerserve.decoding.methods.base import IDENTITY, DecodingMethod, LanePlanner, Mix
from steerserve.decoding.request import LaneSpec


@dataclass(frozen=True)
class PlainParams:
    pass


@dataclass(frozen=True, eq=False)
class Plain(DecodingMethod):
    name: ClassVar[str] = "plain"
    Params: ClassVar[type] = PlainParams
    lanes: tuple[LaneSpec, ...]

    @classmethod
    def build(cls, params: PlainParams, planner: LanePlanner) -> Plain:
        return cls((planner.base,))

    def mix(self) -> Mix:
        return IDENTITY
