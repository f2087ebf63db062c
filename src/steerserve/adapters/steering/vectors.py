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
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from steerserve.adapters.errors import AdapterError
from steerserve.adapters.steering.directions import (
    _DIRECTION_KEY,
    MAX_LAYERS,
    MAX_WIDTH,  # noqa: F401 (re-exported)
    TARGETS,  # noqa: F401
    SteeringVector,
    _check_count,
    _check_shape,
    _check_target,
    _write_atomically,
    validate_directions,
)
from steerserve.adapters.steering.gguf_files import (
    GGUF_ARCH,  # noqa: F401 (re-exported)
    _load_gguf,
    export_gguf,  # noqa: F401 (re-exported for server/routes/vectors.py)
)

FORMAT = "steerserve.steering_vector"
VERSION = "1"
MAX_FILE_BYTES = 1 << 30
SUFFIXES = (".safetensors", ".gguf")

_BARE_KEY = re.compile(r"0|[1-9][0-9]*")
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                       "F64": torch.float64}


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
