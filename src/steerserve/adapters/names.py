"""Names that can become file names: LoRA adapters, steering vectors, SAEs, temperature
heads and shared-store records. One rule for all, checked where a name enters (the request
schema, the command line, a directory listing) and again where a path is built from it:
1 to 128 letters, digits, '.', '_' or '-', not starting with '.', so a name can neither leave
its directory nor hide as a dotfile."""

from __future__ import annotations

import re
from pathlib import Path

from steerserve.adapters.errors import AdapterError

MAX_NAME_LENGTH = 128
NAME_PATTERN = rf"^[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}$"
_NAME = re.compile(NAME_PATTERN)
NAME_RULE = (f"1 to {MAX_NAME_LENGTH} letters, digits, '.', '_' or '-', not starting "
             "with '.'")


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: object, what: str, param: str | None = "name") -> str:
    if not is_valid_name(name):
        raise AdapterError(f"invalid {what} name {str(name)[:64]!r}: use {NAME_RULE}",
                           param=param)
    return name


def path_for(root: Path, name: str, suffix: str, what: str) -> Path:
    """`root/name+suffix`, refused unless it lies directly inside `root`."""
    check_name(name, what)
    root = Path(root).resolve()
    path = (root / f"{name}{suffix}").resolve()
    if path.parent != root:
        raise AdapterError(f"the {what} name {name!r} leaves its directory", param="name")
    return path
