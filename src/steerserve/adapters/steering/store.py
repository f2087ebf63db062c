"""Named steering vectors held by the server, optionally persisted to a directory.

With a directory, vectors added with persist=True are saved there as `<name>.safetensors`,
every `*.safetensors` / `*.gguf` in it is loaded at start (name = file stem), and removing such
a vector deletes its file. Files given on the command line (add_file) are only read: they are
never copied into the directory nor deleted.

Names become file names: adapters/names.py's rule, and the path is checked again where it is
built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from steerserve.adapters.names import check_name, path_for
from steerserve.adapters.registry import AdapterRegistry, NameTaken
from steerserve.adapters.steering.vectors import (
    SUFFIXES,
    SteeringVector,
    load_vector_file,
    save_safetensors,
)

logger = logging.getLogger(__name__)

def check_vector_name(name: str, param: str | None = "name") -> str:
    return check_name(name, "steering vector", param)


@dataclass(frozen=True)
class _Entry:
    vector: SteeringVector
    file: Path | None  # a file in the store's directory, deleted with the vector
    stamp: tuple[int, int, int] | None = None  # the file's (inode, mtime, size) when read


def _stamp(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, info.st_size


def _stamp_or_none(path: Path) -> tuple[int, int, int] | None:
    try:
        return _stamp(path)
    except OSError:
        return None


class VectorStore:
    """Thread-safe: the registry reserves a name while its file is written or read."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._entries: AdapterRegistry[_Entry] = AdapterRegistry()

    def load_directory(self) -> list[str]:
        """Load every vector file in the directory (created if missing); a bad file raises
        AdapterError naming it (the operator should fix or remove it rather than start
        without it). A name already loaded (a --steering-vector given at start, which wins)
        is skipped with a warning: a start-up vector deleted and extracted again under its
        name leaves both, and the next start must not fail on that."""
        if self.directory is None:
            return []
        self.directory.mkdir(parents=True, exist_ok=True)
        names = []
        for path in sorted(self.directory.iterdir()):
            if path.suffix.lower() not in SUFFIXES or path.name.startswith("."):
                continue
            name = check_vector_name(path.stem, param="path")
            if self._entries.get(name) is not None:
                logger.warning("steering vector '%s' in %s is not loaded: a vector given at "
                               "start has that name", name, path)
                continue
            self._load_from_directory(name, path)
            names.append(name)
        return names

    def _load_from_directory(self, name: str, path: Path) -> None:
        stamp = _stamp(path)  # before reading: a file replaced meanwhile is read again later
        self._entries.load(name, lambda: _Entry(load_vector_file(name, path), path, stamp))
        logger.info("loaded steering vector '%s' from %s", name, path)

    def sync_directory(self) -> dict[str, str]:
        """Catch up with other writers of the directory (replicas sharing it): load new files,
        drop vectors whose file is gone, read again files replaced under the same name. A file
        that does not load is logged and skipped (it is another writer's, not a start-up
        mistake); the skipped files are returned with why. Vectors given at start are never
        touched."""
        skipped: dict[str, str] = {}
        if self.directory is None:
            return skipped
        present = {}
        for path in self.directory.iterdir():
            if path.suffix.lower() in SUFFIXES and not path.name.startswith("."):
                present[path.stem] = path
        for name, entry in self._entries.items():
            if entry.file is None:
                continue
            path = present.get(name)
            if path is None or path != entry.file or _stamp_or_none(path) != entry.stamp:
                self._entries.remove(name)
                logger.info("steering vector '%s' changed or left %s", name, self.directory)
        for name, path in present.items():
            if self._entries.get(name) is not None:
                continue
            try:
                check_vector_name(name, param="path")
                self._load_from_directory(name, path)
            except NameTaken:  # this store is writing it right now
                pass
            except Exception as exc:  # another writer's file, whatever is wrong with it
                logger.warning("steering vector file %s is not loaded: %s", path, exc)
                skipped[path.name] = f"{type(exc).__name__}: {exc}"
        return skipped

    def add(self, vector: SteeringVector, persist: bool) -> None:
        """Raises NameTaken if the name is in use; with persist (and a directory) the file is
        written first, so a failed write leaves the store unchanged."""
        check_vector_name(vector.name)
        self._entries.load(vector.name, lambda: self._persist(vector, persist))

    def _persist(self, vector: SteeringVector, persist: bool) -> _Entry:
        if not persist or self.directory is None:
            return _Entry(vector, None)
        path = path_for(self.directory, vector.name, ".safetensors", "steering vector")
        save_safetensors(vector, path)
        logger.info("saved steering vector '%s' to %s", vector.name, path)
        return _Entry(vector, path, _stamp(path))

    def add_file(self, name: str, path: Path) -> SteeringVector:
        """A vector given at start (--steering-vector NAME=PATH): read, never copied."""
        check_vector_name(name)
        entry = self._entries.load(name, lambda: _Entry(load_vector_file(name, path), None))
        logger.info("loaded steering vector '%s' from %s", name, path)
        return entry.vector

    def get(self, name: str) -> SteeringVector | None:
        entry = self._entries.get(name)
        return entry.vector if entry is not None else None

    def items(self) -> list[tuple[str, SteeringVector]]:
        return [(name, entry.vector) for name, entry in self._entries.items()]

    def remove(self, name: str) -> bool:
        entry = self._entries.remove(name)
        if entry is None:
            return False
        if entry.file is not None:
            try:
                entry.file.unlink(missing_ok=True)
            except OSError as err:  # gone from memory anyway; it would come back at restart
                logger.error("could not delete %s for steering vector '%s': %s", entry.file,
                             name, err)
        return True
