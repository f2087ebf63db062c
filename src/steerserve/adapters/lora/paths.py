"""Adapter directories: resolving a requested path and confining it to the adapter root."""

from __future__ import annotations

from pathlib import Path

from steerserve.adapters.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def resolve_adapter_path(requested: str, root: Path | None, param: str = "lora_path") -> Path:
    """The adapter directory for `requested`, resolved (symlinks followed) and confined to
    `root`. root=None accepts only absolute paths and confines nothing: it is meant for paths
    the operator gave at start-up (--lora NAME=PATH); paths from requests must have a root.
    (Confinement is checked, not enforced at open time: whoever can write inside the root can
    still swap files afterwards, so the root must not be writable by clients.)"""
    if not requested or "\x00" in requested:
        raise AdapterError("the adapter path is empty or contains a NUL byte", param=param)
    path = Path(requested)
    if root is None and not path.is_absolute():
        raise AdapterError(f"relative adapter path '{requested}' needs an adapter root",
                           param=param)
    base = root.resolve() if root is not None else None
    resolved = _resolve(base / path if base is not None else path, requested, param)
    if base is not None:
        _ensure_inside(resolved, base, requested, param)
    if not resolved.exists():
        raise AdapterError(f"adapter directory '{requested}' not found", 404, param)
    if not resolved.is_dir():
        raise AdapterError(f"adapter path '{requested}' is not a directory", param=param)
    if base is not None:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            _ensure_inside(_resolve(resolved / name, requested, param), base, requested, param)
    return resolved


def _resolve(path: Path, requested: str, param: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # symlink loops
        raise AdapterError(f"adapter path '{requested}' cannot be resolved", param=param) from err


def _ensure_inside(path: Path, base: Path, requested: str, param: str) -> None:
    # The root's location is not echoed back: clients need not learn the server's layout.
    if not path.is_relative_to(base):
        raise AdapterError(f"adapter path '{requested}' leads outside the adapter root "
                           "('..', an absolute path or a symlink)", param=param)
