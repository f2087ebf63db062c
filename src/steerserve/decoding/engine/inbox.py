"""Typed messages from the HTTP threads to the engine thread."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from steerserve.decoding.request import EngineRequest, OutputSink


@dataclass(frozen=True)
class Submit:
    request: EngineRequest
    sink: OutputSink


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Call:
    """Run `work` on the engine thread between two steps (it may use the models)."""

    work: Callable[[], object]
    future: Future


@dataclass(frozen=True)
class Wake:
    """Nothing to do: lets a stopping engine leave its wait."""


Message = Submit | Abort | Call | Wake
