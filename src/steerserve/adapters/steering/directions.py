"""SteeringVector and what its file formats share: direction checks, atomic writes."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerserve.adapters.errors import AdapterError

TARGETS = ("residual", "heads")
MAX_LAYERS = 1024  # bounds both the number of directions and a layer's index
MAX_WIDTH = 65536

# Canonical decimal only, so "direction.1" and "direction.01" cannot name one layer twice.
_DIRECTION_KEY = re.compile(r"direction\.(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class SteeringVector:
    name: str
    directions: dict[int, torch.Tensor]  # layer -> (width,) float32, CPU, contiguous
    width: int
    target: str = "residual"
    model: str | None = None  # hosted model it was extracted on, or the GGUF model_hint
    method: str | None = None
    created: str | None = None  # ISO 8601, UTC
    source: str = "extracted"  # "extracted", "safetensors" or "gguf"

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "layers": self.layers, "width": self.width,
                "target": self.target, "model": self.model, "method": self.method,
                "created": self.created, "source": self.source}


# ---- checks ----------------------------------------------------------------------------------


def validate_directions(directions: Mapping[int, torch.Tensor], label: str,
                        param: str | None) -> tuple[dict[int, torch.Tensor], int]:
    """(layer -> float32 CPU contiguous direction, width) after checking count, layer indices,
    shapes, the common width and finiteness; `label` starts every message
    (e.g. "steering vector file x.gguf")."""
    if not directions:
        raise AdapterError(f"{label}: holds no direction tensors (expected direction.N)",
                           param=param)
    _check_count(len(directions), label, param)
    checked = {layer: _check_direction(layer, t, label, param)
               for layer, t in sorted(directions.items())}
    widths = {t.numel() for t in checked.values()}
    if len(widths) > 1:
        detail = ", ".join(f"direction.{n}: {t.numel()}" for n, t in checked.items())
        raise AdapterError(f"{label}: directions have different widths ({detail})", param=param)
    return checked, widths.pop()


def _check_direction(layer: int, tensor: torch.Tensor, label: str,
                     param: str | None) -> torch.Tensor:
    where = f"{label}: direction.{layer}"
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < MAX_LAYERS:
        raise AdapterError(f"{label}: layer index {layer!r} is not an integer in "
                           f"0..{MAX_LAYERS - 1}", param=param)
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise AdapterError(f"{where} is not a floating point tensor", param=param)
    _check_shape(tuple(tensor.shape), where, param)
    direction = tensor.detach().to("cpu", torch.float32).contiguous()
    if torch.isnan(direction).any():
        raise AdapterError(f"{where} contains NaN", param=param)
    if not torch.isfinite(direction).all():  # also catches F64 values beyond float32's range
        raise AdapterError(f"{where} contains an infinite value", param=param)
    return direction


def _check_shape(shape: tuple[int, ...], where: str, param: str | None) -> None:
    if len(shape) != 1:
        raise AdapterError(f"{where} must be 1-D, got shape {list(shape)}", param=param)
    if not 1 <= shape[0] <= MAX_WIDTH:
        raise AdapterError(f"{where} has width {shape[0]}, expected 1..{MAX_WIDTH}",
                           param=param)


def _check_count(count: int, label: str, param: str | None) -> None:
    if count > MAX_LAYERS:
        raise AdapterError(f"{label}: {count} directions, at most {MAX_LAYERS} are accepted",
                           param=param)


def _check_target(target: str, label: str, param: str | None) -> str:
    if target not in TARGETS:
        raise AdapterError(f"{label}: target '{target}' is not one of {', '.join(TARGETS)}",
                           param=param)
    return target


# ---- writing ---------------------------------------------------------------------------------


def _write_atomically(path: Path, write: Any) -> None:
    # The ".tmp" suffix keeps a leftover from a crash out of a directory scan for vectors.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
