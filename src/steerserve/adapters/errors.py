"""The one error type of adapter files and registries (LoRA adapters, steering vectors)."""

from __future__ import annotations


class AdapterError(ValueError):
    """A refused adapter: `status` is the HTTP status (400 bad adapter, 404 not found) and
    `param` the request field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
