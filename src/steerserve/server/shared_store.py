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
from steerserve.adapters.names import is_valid_name, path_for
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


def _record_path(file: Path) -> str:
    """An adapter record's `path`: a JSON object with a string `path`, or ValueError."""
    try:
        record = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
        raise ValueError('not an object with a string "path"')
    return record["path"]


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
        self.skipped: dict[str, str] = {}  # store file (relative) -> why it is not loaded

    # ---- writers (the admin routes of the replica that got the request) ----------------------
    def publish_lora(self, name: str, path: Path) -> None:
        _write_json_atomically(path_for(self.loras, name, ".json", "adapter"),
                               {"path": str(path)})
        with self._lock:
            self._shared_loras.add(name)
            # the directory may return to the listing of the last sync (another replica
            # retracts this file before we sync again): compare afresh next time
            self._seen.pop(self.loras, None)

    def retract_lora(self, name: str) -> None:
        path_for(self.loras, name, ".json", "adapter").unlink(missing_ok=True)
        with self._lock:
            self._shared_loras.discard(name)
            self._seen.pop(self.loras, None)

    # ---- readers -------------------------------------------------------------------------------
    def sync(self, ctx: ServingContext) -> None:
        """Bring this replica up to date. What does not load (a torn or hand-edited file, a
        name that is not a name) is logged once per change of its directory, skipped and
        listed in `skipped` (GET /v1/shared_store); it never fails the request that synced."""
        with self._lock:
            for directory, apply in ((self.vectors, self._sync_vectors),
                                     (self.loras, self._sync_loras),
                                     (self.heads, self._sync_heads)):
                listing = _listing(directory)
                if listing == self._seen.get(directory):
                    continue
                self._seen[directory] = listing
                prefix = f"{directory.name}/"
                self.skipped = {k: v for k, v in self.skipped.items()
                                if not k.startswith(prefix)}
                try:
                    apply(ctx, listing)
                except Exception as exc:  # a store fault must not become every route's 500
                    logger.exception("shared store %s could not be read", directory)
                    self.skipped[prefix] = f"{type(exc).__name__}: {exc}"

    def _skip(self, file: str, reason: object) -> None:
        logger.warning("shared store file %s is not loaded: %s", file, reason)
        self.skipped[file] = str(reason)

    def _sync_vectors(self, ctx: ServingContext, _: Listing) -> None:
        for file, reason in ctx.vectors.sync_directory().items():
            self.skipped[f"vectors/{file}"] = reason

    def _sync_loras(self, ctx: ServingContext, listing: Listing) -> None:
        wanted = set()
        for file in listing:
            name = file.removesuffix(".json")
            if file.endswith(".json") and is_valid_name(name):
                wanted.add(name)
            else:
                self._skip(f"loras/{file}", "not NAME.json with a valid adapter name")
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
            except (APIError, AdapterError, NameTaken, OSError, ValueError) as exc:
                self._skip(f"loras/{name}.json", exc)

    def _load_lora(self, ctx: ServingContext, name: str) -> None:
        from steerserve.server.routes.lora import register  # routes import this module

        adapter_path = _record_path(path_for(self.loras, name, ".json", "adapter"))
        root = Path(ctx.settings.adapter_dir) if ctx.settings.adapter_dir else None
        if root is None or not ctx.engine.lora_enabled:
            raise AdapterError("this replica has no --adapter-dir or no LoRA slots")
        register(ctx, name, resolve_adapter_path(adapter_path, root))

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
                head = load_temperature_head(
                    path_for(self.heads, name, ".safetensors", "temperature head"),
                    model.shape.hidden_size)
            except (ValueError, OSError) as exc:
                self._skip(f"heads/{name}.safetensors", exc)
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
