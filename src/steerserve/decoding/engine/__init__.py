"""The engine as the server sees it: the façade and what it may raise or report. Nothing
outside `decoding/` imports the engine's modules directly (tests/test_layout.py)."""

from steerserve.decoding.engine.admission import Inadmissible
from steerserve.decoding.engine.client import EngineClient, RequestStream
from steerserve.decoding.engine.core import EngineConfig, EngineUnavailable, QueueFull
from steerserve.decoding.engine.output import EngineStats

__all__ = ["EngineClient", "EngineConfig", "EngineStats", "EngineUnavailable", "Inadmissible",
           "QueueFull", "RequestStream"]
