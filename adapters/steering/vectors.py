"""Steering (control) vectors on disk: safetensors and llama.cpp/repeng GGUF, strictly checked.

A steering vector is a set of per-layer directions: layer N -> a 1-D float32 tensor as wide as
the model's hidden size. Layer N is the output of decoder block N, 0-based, i.e. HF
`hidden_states[N + 1]`. This is repeng's numbering (its ControlModel wraps
`model.model.layers[N]`, and it writes `direction.N` tensors to GGUF), and llama.cpp also adds
`direction.N` after block N (it refuses N = 0, so a vector with layer 0 exported to GGUF loads
here and in repeng but not in llama.cpp).

A vector's target is "residual" (added to the residual stream after the block) or "heads": then
each direction is the concatenated per-head attention output (num_heads * head_dim wide, the
input of o_proj), stored with the same layout and `target` metadata "heads".

Files are untrusted input: nothing is unpickled (.pt/.bin/.npy are refused), every tensor must
be a finite 1-D float direction of one common width, and tensors that are not directions are
refused rather than ignored.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from steerserve.adapters.errors import AdapterError

FORMAT = "steerserve.steering_vector"
VERSION = "1"
TARGETS = ("residual", "heads")
GGUF_ARCH = "controlvector"
MAX_LAYERS = 1024  # bounds both the number of directions and a layer's index
MAX_WIDTH = 65536
MAX_FILE_BYTES = 1 << 30
SUFFIXES = (".safetensors", ".gguf")

# Canonical decimal only, so "direction.1" and "direction.01" cannot name one layer twice.
_DIRECTION_KEY = re.compile(r"direction\.(0|[1-9][0-9]*)")
_BARE_KEY = re.compile(r"0|[1-9][0-9]*")
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64}
_GGUF_FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
_GGUF_ERRORS = (ValueError, IndexError, KeyError, OverflowError, TypeError, OSError)


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


def save_safetensors(vector: SteeringVector, path: Path) -> None:
    """Write `vector` to `path` atomically (a temporary file in the same directory, then
    os.replace), so readers never see a half-written file."""
    # clone(): safetensors refuses tensors sharing storage (views of one extraction batch).
    tensors = {f"direction.{n}": t.detach().to("cpu", torch.float32).contiguous().clone()
               for n, t in vector.directions.items()}
    metadata = {"format": FORMAT, "version": VERSION, "width": str(vector.width),
                "layers": json.dumps(vector.layers), "target": vector.target}
    optional = {"model": vector.model, "method": vector.method, "created": vector.created}
    metadata.update({k: v for k, v in optional.items() if v is not None})  # strings only
    _write_atomically(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def export_gguf(vector: SteeringVector, path: Path, model_hint: str) -> None:
    """Write the layout repeng's ControlVector.export_gguf writes (and llama.cpp reads)."""
    if vector.target != "residual":
        # llama.cpp adds every direction to the residual stream: a heads vector would be wrong.
        raise AdapterError(f"steering vector '{vector.name}' targets attention heads; GGUF "
                           "control vectors are residual-stream only", param="format")

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, GGUF_ARCH)
        writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(vector.directions))
        for layer in vector.layers:
            data = vector.directions[layer].detach().to("cpu", torch.float32).numpy()
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(data))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _write_atomically(Path(path), write)


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


# ---- reading ---------------------------------------------------------------------------------


def load_vector_file(name: str, path: Path | str, param: str | None = "path") -> SteeringVector:
    """Load and check a .safetensors or .gguf steering vector file."""
    path = Path(path)
    label = f"steering vector file {path.name}"
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise AdapterError(f"{label}: unsupported format '{suffix or path.name}'; steering "
                           "vectors are read from .safetensors or .gguf files only (pickled "
                           ".pt/.bin/.npy files are never loaded)", param=param)
    _check_file(path, label, param)
    if suffix == ".gguf":
        return _load_gguf(name, path, label, param)
    return _load_safetensors(name, path, label, param)


def _check_file(path: Path, label: str, param: str | None) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise AdapterError(f"{label} not found", 404, param) from None
    except OSError as err:
        raise AdapterError(f"{label} cannot be read ({err.strerror})", param=param) from None
    if not path.is_file():
        raise AdapterError(f"{label} is not a regular file", param=param)
    if info.st_size > MAX_FILE_BYTES:
        raise AdapterError(f"{label} is {info.st_size} bytes, larger than the "
                           f"{MAX_FILE_BYTES} byte limit", param=param)


def _load_safetensors(name: str, path: Path, label: str, param: str | None) -> SteeringVector:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            layers = _safetensors_layers(handle, label, param)
            raw = {layer: handle.get_tensor(key) for key, layer in layers.items()}
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{label} is not a valid safetensors file ({err})",
                           param=param) from None
    directions, width = validate_directions(raw, label, param)
    target = _check_metadata(metadata, directions, width, label, param)
    return SteeringVector(name, directions, width, target, metadata.get("model"),
                          metadata.get("method"), metadata.get("created"), "safetensors")


def _safetensors_layers(handle: Any, label: str, param: str | None) -> dict[str, int]:
    """key -> layer for every tensor, checked from the header before any data is read."""
    layers: dict[str, int] = {}
    keys: list[str] = handle.keys()
    _check_count(len(keys), label, param)
    for key in keys:
        if not (_DIRECTION_KEY.fullmatch(key) or _BARE_KEY.fullmatch(key)):
            raise AdapterError(f"{label}: unexpected tensor '{key}' (expected direction.N "
                               "or N, with N a layer index)", param=param)
        layer = int(key.removeprefix("direction."))
        if layer in layers.values():
            raise AdapterError(f"{label}: layer {layer} appears twice", param=param)
        if layer >= MAX_LAYERS:
            raise AdapterError(f"{label}: layer index {layer} is beyond {MAX_LAYERS - 1}",
                               param=param)
        chunk = handle.get_slice(key)
        where = f"{label}: direction.{layer}"
        if chunk.get_dtype() not in _SAFETENSORS_DTYPES:
            raise AdapterError(f"{where} has dtype {chunk.get_dtype()}, expected a float "
                               "type (F32, F16, BF16, F64)", param=param)
        _check_shape(tuple(chunk.get_shape()), where, param)
        layers[key] = layer
    return layers


def _check_metadata(metadata: dict[str, str], directions: dict[int, torch.Tensor], width: int,
                    label: str, param: str | None) -> str:
    """The target; metadata that contradicts the tensors is refused, not trusted."""
    if metadata.get("format") == FORMAT and metadata.get("version") != VERSION:
        raise AdapterError(f"{label}: unsupported {FORMAT} version "
                           f"'{metadata.get('version')}' (expected {VERSION})", param=param)
    if "width" in metadata and metadata["width"] != str(width):
        raise AdapterError(f"{label}: metadata says width {metadata['width']} but the "
                           f"directions are {width} wide", param=param)
    if "layers" in metadata and _json_or_none(metadata["layers"]) != sorted(directions):
        raise AdapterError(f"{label}: metadata lists layers {metadata['layers']} but the file "
                           f"holds {sorted(directions)}", param=param)
    return _check_target(metadata.get("target", "residual"), label, param)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _load_gguf(name: str, path: Path, label: str, param: str | None) -> SteeringVector:
    try:
        reader = gguf.GGUFReader(path)  # parses the header and maps the tensors, no pickle
        arch = _gguf_string(reader, "general.architecture")
        hint = _gguf_string(reader, f"{GGUF_ARCH}.model_hint")
    except _GGUF_ERRORS as err:
        raise AdapterError(f"{label} is not a valid GGUF file ({err})", param=param) from None
    if arch != GGUF_ARCH:
        raise AdapterError(f"{label}: GGUF architecture is '{arch}', expected "
                           f"'{GGUF_ARCH}' (is this a model rather than a control vector?)",
                           param=param)
    directions, width = validate_directions(_gguf_directions(reader, label, param), label, param)
    return SteeringVector(name, directions, width, "residual", hint, None, None, "gguf")


def _gguf_string(reader: gguf.GGUFReader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or field.types != [gguf.GGUFValueType.STRING]:
        return None
    return str(field.contents())


def _gguf_directions(reader: gguf.GGUFReader, label: str,
                     param: str | None) -> dict[int, torch.Tensor]:
    directions: dict[int, torch.Tensor] = {}
    _check_count(len(reader.tensors), label, param)
    for tensor in reader.tensors:
        match = _DIRECTION_KEY.fullmatch(tensor.name)
        if match is None:
            raise AdapterError(f"{label}: unexpected tensor '{tensor.name}' (a control vector "
                               "holds only direction.N tensors)", param=param)
        layer = int(match.group(1))
        where = f"{label}: {tensor.name}"
        if tensor.tensor_type not in _GGUF_FLOAT_TYPES:
            raise AdapterError(f"{where} has type {tensor.tensor_type.name}, expected F32 or "
                               "F16", param=param)
        if layer >= MAX_LAYERS:
            raise AdapterError(f"{label}: layer index {layer} is beyond {MAX_LAYERS - 1}",
                               param=param)
        _check_shape(tuple(tensor.data.shape), where, param)  # numpy order
        # Copy out of the reader's memory map so the file is not held open.
        directions[layer] = torch.from_numpy(np.array(tensor.data, dtype=np.float32))
    return directions

