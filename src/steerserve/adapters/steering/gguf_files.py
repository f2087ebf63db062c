"""Steering vectors as llama.cpp/repeng GGUF control vectors: export and strict loading."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from steerserve.adapters.errors import AdapterError
from steerserve.adapters.steering.directions import (
    _DIRECTION_KEY,
    MAX_LAYERS,
    SteeringVector,
    _check_count,
    _check_shape,
    _write_atomically,
    validate_directions,
)

GGUF_ARCH = "controlvector"
_GGUF_FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
_GGUF_ERRORS = (ValueError, IndexError, KeyError, OverflowError, TypeError, OSError)


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
