"""State every replica of a scaled-out server must agree on, kept in one shared directory.

`--shared-store DIR` (a directory on storage every replica mounts) holds:
- `vectors/`: the steering vectors directory (extracted vectors are saved there);
- `loras/NAME.json`: `{"path": ...}` for each adapter loaded at runtime (the path itself must be
  on shared storage, under --adapter-dir);
- `heads/NAME.safetensors`: learned temperature heads.

A replica catches up before every /v1 request: it lists the three directories (a few stat
calls) and loads, drops or reloads what changed since its last look, so a vector extracted or an
adapter loaded through any replica is usable through every replica by the next request. Files
are written to a dotfile and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from steerserve.adapters.lora.files import AdapterError, resolve_adapter_path
from steerserve.adapters.registry import NameTaken
from steerserve.decoding.sampling.temperature_head import load_temperature_head
from steerserve.server.errors import APIError

if TYPE_CHECKING:
    from steerserve.server.context import ServingContext

logger = logging.getLogger(__name__)

Listing = dict[str, tuple[int, int, int]]  # file name -> (inode, mtime, size)


def _listing(directory: Path) -> Listing:
    found = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                info = entry.stat()
                found[entry.name] = (info.st_ino, info.st_mtime_ns, info.st_size)
    return found


def _write_json_atomically(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


class SharedStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.vectors = self.root / "vectors"
        self.loras = self.root / "loras"
        self.heads = self.root / "heads"
        for directory in (self.vectors, self.loras, self.heads):
            directory.mkdir(parents=True, exist_ok=True)
        self._seen: dict[Path, Listing] = {}
        self._lock = threading.Lock()
        self._shared_loras: set[str] = set()  # adapters this replica loaded from loras/
        self._shared_heads: dict[str, tuple[int, int, int]] = {}

    # ---- writers (the admin routes of the replica that got the request) ----------------------
    def publish_lora(self, name: str, path: Path) -> None:
        _write_json_atomically(self.loras / f"{name}.json", {"path": str(path)})
        with self._lock:
            self._shared_loras.add(name)

    def retract_lora(self, name: str) -> None:
        (self.loras / f"{name}.json").unlink(missing_ok=True)
        with self._lock:
            self._shared_loras.discard(name)

    # ---- readers -------------------------------------------------------------------------------
    def sync(self, ctx: ServingContext) -> None:
        """Bring this replica up to date; what does not load is logged and skipped (it is
        another replica's write, which that replica already checked and answered for)."""
        with self._lock:
            for directory, apply in ((self.vectors, self._sync_vectors),
                                     (self.loras, self._sync_loras),
                                     (self.heads, self._sync_heads)):
                listing = _listing(directory)
                if listing != self._seen.get(directory):
                    apply(ctx, listing)
                    self._seen[directory] = listing

    def _sync_vectors(self, ctx: ServingContext, _: Listing) -> None:
        ctx.vectors.sync_directory()

    def _sync_loras(self, ctx: ServingContext, listing: Listing) -> None:
        wanted = {name.removesuffix(".json") for name in listing if name.endswith(".json")}
        for name in sorted(self._shared_loras - wanted):
            ctx.engine.unload_adapter(name)
            self._shared_loras.discard(name)
            logger.info("LoRA adapter '%s' unloaded (gone from the shared store)", name)
        for name in sorted(wanted - self._shared_loras):
            if ctx.engine.adapters.get(name) is not None:
                continue  # loaded at start under that name: the command line wins
            try:
                self._load_lora(ctx, name)
                self._shared_loras.add(name)
            except (APIError, AdapterError, NameTaken, OSError, ValueError, KeyError) as exc:
                logger.warning("shared LoRA adapter '%s' is not loaded: %s", name, exc)

    def _load_lora(self, ctx: ServingContext, name: str) -> None:
        from steerserve.server.routes.lora import register  # routes import this module

        record = json.loads((self.loras / f"{name}.json").read_text())
        root = Path(ctx.settings.adapter_dir) if ctx.settings.adapter_dir else None
        if root is None or not ctx.engine.lora_enabled:
            raise AdapterError("this replica has no --adapter-dir or no LoRA slots")
        register(ctx, name, resolve_adapter_path(str(record["path"]), root))

    def _sync_heads(self, ctx: ServingContext, listing: Listing) -> None:
        files = {name.removesuffix(".safetensors"): stamp for name, stamp in listing.items()
                 if name.endswith(".safetensors")}
        for name, stamp in list(self._shared_heads.items()):
            if files.get(name) != stamp:
                ctx.temperature_heads.pop(name, None)
                del self._shared_heads[name]
        model = ctx.engine.primary
        for name, stamp in files.items():
            if name in self._shared_heads or name in ctx.temperature_heads:
                continue  # loaded already, or a --temperature-head of that name (it wins)
            try:
                head = load_temperature_head(self.heads / f"{name}.safetensors",
                                             model.shape.hidden_size)
            except ValueError as exc:
                logger.warning("shared temperature head '%s' is not loaded: %s", name, exc)
                continue
            ctx.temperature_heads[name] = head.to(model.device)
            self._shared_heads[name] = stamp
            logger.info("loaded temperature head '%s' from the shared store", name)


class CatchUp:
    """Pure ASGI: before each API request this replica catches up with the shared store (on
    the request worker, where parsing runs, so a slow share never blocks the event loop)."""

    SKIPPED = ("/health", "/metrics")

    def __init__(self, app, ctx: ServingContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.SKIPPED:
            try:
                await self.ctx.off_loop(self.ctx.shared.sync, self.ctx)
            except OSError as exc:  # the share is unreachable: serve what this replica has
                logger.error("shared store %s: %s", self.ctx.shared.root, exc)
        await self.app(scope, receive, send)
