"""Named LoRA adapters loaded on the server, safe to use from several threads.

The engine holds on to the adapter object a running lane uses, so unloading a name only stops
new requests from choosing it: lanes in flight finish, then their slot becomes reusable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Adapter = TypeVar("Adapter")


class NameTaken(ValueError):
    pass


class AdapterRegistry(Generic[Adapter]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._adapters: dict[str, Adapter] = {}
        self._loading: set[str] = set()

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            return self._adapters.get(name)

    def items(self) -> list[tuple[str, Adapter]]:
        with self._lock:
            return sorted(self._adapters.items())

    def load(self, name: str, loader: Callable[[], Adapter]) -> Adapter:
        """Reserve the name, run the (slow) loader outside the lock, then publish. A loader
        that raises leaves the registry as it was."""
        with self._lock:
            if name in self._adapters or name in self._loading:
                raise NameTaken(f"an adapter named '{name}' is already loaded")
            self._loading.add(name)
        try:
            adapter = loader()
            with self._lock:
                self._adapters[name] = adapter
            return adapter
        finally:
            with self._lock:
                self._loading.discard(name)

    def remove(self, name: str) -> Adapter | None:
        with self._lock:
            return self._adapters.pop(name, None)
