"""Safetensors files that say what they are: tensors plus a "format" tag in the metadata.

The learned heads and routers are such files; nothing else is read (never pickle). Every
problem is a ValueError that names the file and its kind ("temperature head '...'").
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def read_tagged(path: Path, expected_format: str,
                label: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a .safetensors file whose metadata "format" is expected."""
    if path.suffix != ".safetensors":
        raise ValueError(f"{label} '{path}': only .safetensors files are loaded (never "
                         "pickle)")
    if not path.is_file():
        raise ValueError(f"{label} '{path}': no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ValueError(f"{label} '{path}': unreadable safetensors ({exc})") from exc
    if metadata.get("format") != expected_format:
        raise ValueError(f"{label} '{path}': metadata 'format' is "
                         f"{metadata.get('format')!r}, expected '{expected_format}'")
    return metadata, tensors
