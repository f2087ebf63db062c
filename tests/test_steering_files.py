"""Steering vector files (safetensors, repeng/llama.cpp GGUF) and the vector store: round trips
against repeng's own writer and reader, and every bad file refused with a clear AdapterError."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from repeng import ControlVector
from safetensors import safe_open
from safetensors.torch import save_file

from steerserve.adapters.errors import AdapterError
from steerserve.adapters.registry import NameTaken
from steerserve.adapters.steering.store import VectorStore
from steerserve.adapters.steering.vectors import (
    FORMAT,
    SteeringVector,
    export_gguf,
    load_vector_file,
    save_safetensors,
)

WIDTH = 64
LAYERS = (1, 2, 3, 4, 5)


def _vector(name: str = "honest", layers: tuple[int, ...] = LAYERS, seed: int = 0,
            target: str = "residual") -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    directions = {n: torch.randn(WIDTH, generator=gen) for n in layers}
    return SteeringVector(name, directions, WIDTH, target, "tiny-llama", "pca_diff",
                          "2025-01-02T03:04:05Z", "extracted")


def _numpy_directions(seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(WIDTH).astype(np.float32) for n in LAYERS}


def _write_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector") -> Path:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", "llama")
    for key, value in tensors.items():
        writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _refused(path: Path, *fragments: str, status: int = 400) -> AdapterError:
    with pytest.raises(AdapterError) as info:
        load_vector_file("v", path)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.status == status
    assert info.value.param == "path"
    return info.value


# ---- safetensors -----------------------------------------------------------------------------


def test_safetensors_round_trip_is_bit_exact(tmp_path: Path) -> None:
    vector = _vector(target="heads")
    path = tmp_path / "honest.safetensors"
    save_safetensors(vector, path)
    loaded = load_vector_file("other", path)
    assert loaded.layers == list(LAYERS)
    for n in LAYERS:
        assert torch.equal(loaded.directions[n], vector.directions[n])
        assert loaded.directions[n].dtype == torch.float32
    assert (loaded.name, loaded.width, loaded.target, loaded.source) == (
        "other", WIDTH, "heads", "safetensors")
    assert (loaded.model, loaded.method, loaded.created) == (
        "tiny-llama", "pca_diff", "2025-01-02T03:04:05Z")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert sorted(handle.keys()) == [f"direction.{n}" for n in LAYERS]
    assert meta["format"] == FORMAT and meta["version"] == "1" and meta["width"] == str(WIDTH)
    assert json.loads(meta["layers"]) == list(LAYERS) and meta["target"] == "heads"
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write cleaned up


def test_describe_is_json_safe() -> None:
    described = _vector().describe()
    assert json.loads(json.dumps(described)) == {
        "name": "honest", "layers": list(LAYERS), "width": WIDTH, "target": "residual",
        "model": "tiny-llama", "method": "pca_diff", "created": "2025-01-02T03:04:05Z",
        "source": "extracted"}


def test_plain_safetensors_with_bare_layer_keys(tmp_path: Path) -> None:
    tensors = {"3": torch.randn(WIDTH), "7": torch.randn(WIDTH, dtype=torch.float16)}
    save_file(tensors, tmp_path / "peer.safetensors")
    loaded = load_vector_file("peer", tmp_path / "peer.safetensors")
    assert loaded.layers == [3, 7] and loaded.target == "residual" and loaded.model is None
    assert torch.equal(loaded.directions[3], tensors["3"])
    assert torch.equal(loaded.directions[7], tensors["7"].float())


def test_safetensors_refusals(tmp_path: Path) -> None:
    good = torch.randn(WIDTH)
    cases = {
        "nan": ({"direction.3": torch.tensor([0.0, float("nan")])}, ["direction.3 contains NaN"]),
        "inf": ({"direction.2": torch.tensor([float("inf"), 1.0])}, ["direction.2", "infinite"]),
        "widths": ({"direction.1": good, "direction.2": torch.randn(32)},
                   ["different widths", "direction.2: 32"]),
        "twod": ({"direction.1": torch.randn(2, WIDTH)}, ["direction.1 must be 1-D", "[2, 64]"]),
        "other": ({"direction.1": good, "lm_head.weight": good.clone()},
                  ["unexpected tensor", "lm_head.weight"]),
        "negative": ({"direction.-1": good}, ["unexpected tensor"]),
        "twice": ({"direction.1": good, "1": good.clone()}, ["layer 1 appears twice"]),
        "int": ({"direction.1": torch.arange(4)}, ["dtype I64"]),
        "empty": ({}, ["no direction tensors"]),
    }
    for stem, (tensors, fragments) in cases.items():
        path = tmp_path / f"{stem}.safetensors"
        save_file(tensors, path)
        message = str(_refused(path, *fragments))
        assert f"steering vector file {stem}.safetensors" in message


def test_safetensors_metadata_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "meta.safetensors"
    save_file({"direction.1": torch.randn(WIDTH)}, path, metadata={"width": "32"})
    _refused(path, "metadata says width 32")
    save_file({"direction.1": torch.randn(WIDTH)}, path, metadata={"target": "mlp"})
    _refused(path, "target 'mlp'")
    save_file({"direction.1": torch.randn(WIDTH)}, path,
              metadata={"format": FORMAT, "version": "9"})
    _refused(path, "version '9'")


def test_unsupported_suffixes_and_missing_files(tmp_path: Path) -> None:
    for name in ("vector.pt", "vector.bin", "vector.npy", "vector"):
        (tmp_path / name).write_bytes(b"\x80\x04K\x01.")  # a pickle: must never be read
        _refused(tmp_path / name, "unsupported format", ".safetensors or .gguf")
    _refused(tmp_path / "absent.gguf", "absent.gguf not found", status=404)
    (tmp_path / "dir.safetensors").mkdir()
    _refused(tmp_path / "dir.safetensors", "not a regular file")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    _refused(tmp_path / "junk.safetensors", "not a valid safetensors file")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF but not really")
    _refused(tmp_path / "junk.gguf", "not a valid GGUF file")


# ---- GGUF ------------------------------------------------------------------------------------


def test_repeng_gguf_loads_exactly(tmp_path: Path) -> None:
    directions = _numpy_directions()
    path = tmp_path / "repeng.gguf"
    ControlVector(model_type="llama", directions=directions).export_gguf(path)
    loaded = load_vector_file("repeng", path)
    assert loaded.layers == list(LAYERS) and loaded.width == WIDTH
    assert (loaded.model, loaded.target, loaded.source) == ("llama", "residual", "gguf")
    for n, expected in directions.items():
        assert np.array_equal(loaded.directions[n].numpy(), expected)


def test_our_gguf_is_read_by_repeng(tmp_path: Path) -> None:
    vector = _vector()
    path = tmp_path / "ours.gguf"
    export_gguf(vector, path, model_hint="llama")
    imported = ControlVector.import_gguf(path)
    assert imported.model_type == "llama"
    assert sorted(imported.directions) == list(LAYERS)
    for n in LAYERS:
        assert np.array_equal(np.asarray(imported.directions[n]), vector.directions[n].numpy())
    reader = gguf.GGUFReader(path)
    assert reader.get_field("controlvector.layer_count").contents() == len(LAYERS)
    again = load_vector_file("again", path)
    assert all(torch.equal(again.directions[n], vector.directions[n]) for n in LAYERS)


def test_gguf_heads_vector_is_not_exported(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="residual-stream only"):
        export_gguf(_vector(target="heads"), tmp_path / "heads.gguf", "llama")
    assert not list(tmp_path.iterdir())


def test_gguf_f16_is_converted(tmp_path: Path) -> None:
    half = np.linspace(-1, 1, WIDTH).astype(np.float16)
    loaded = load_vector_file("h", _write_gguf(tmp_path / "h.gguf", {"direction.2": half}))
    assert np.array_equal(loaded.directions[2].numpy(), half.astype(np.float32))


def test_gguf_refusals(tmp_path: Path) -> None:
    good = np.ones(WIDTH, dtype=np.float32)
    nan = good.copy()
    nan[5] = np.nan
    cases = {
        "nan": ({"direction.3": nan}, "controlvector", ["x.gguf: direction.3 contains NaN"]),
        "widths": ({"direction.1": good, "direction.2": good[:32]}, "controlvector",
                   ["different widths"]),
        "twod": ({"direction.1": np.ones((2, WIDTH), np.float32)}, "controlvector",
                 ["direction.1 must be 1-D"]),
        "none": ({}, "controlvector", ["no direction tensors"]),
        "arch": ({"token_embd.weight": good}, "llama", ["architecture is 'llama'"]),
        "other": ({"direction.1": good, "bias": good}, "controlvector", ["'bias'"]),
        "int": ({"direction.1": np.ones(WIDTH, np.int32)}, "controlvector", ["type I32"]),
    }
    for stem, (tensors, arch, fragments) in cases.items():
        (tmp_path / stem).mkdir()
        _refused(_write_gguf(tmp_path / stem / "x.gguf", tensors, arch), *fragments)


# ---- the store -------------------------------------------------------------------------------


def test_store_persists_and_reloads(tmp_path: Path) -> None:
    store = VectorStore(tmp_path)
    store.add(_vector("kept"), persist=True)
    store.add(_vector("memory", seed=1), persist=False)
    assert [name for name, _ in store.items()] == ["kept", "memory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.safetensors"]
    ControlVector(model_type="llama", directions=_numpy_directions()).export_gguf(
        tmp_path / "imported.gguf")

    fresh = VectorStore(tmp_path)
    assert fresh.load_directory() == ["imported", "kept"]
    assert fresh.get("memory") is None
    kept = fresh.get("kept")
    assert kept is not None and kept.source == "safetensors" and kept.model == "tiny-llama"
    assert all(torch.equal(kept.directions[n], _vector().directions[n]) for n in LAYERS)

    assert fresh.remove("kept") and fresh.remove("imported")
    assert not fresh.remove("kept")
    assert not list(tmp_path.iterdir())


def test_store_refuses_duplicates_and_bad_names(tmp_path: Path) -> None:
    store = VectorStore(tmp_path)
    store.add(_vector("a"), persist=True)
    with pytest.raises(NameTaken):
        store.add(_vector("a", seed=3), persist=True)
    assert torch.equal(store.get("a").directions[1], _vector("a").directions[1])
    for bad in ("", "../evil", "a/b", ".hidden", "x" * 129, "sp ace", "nul\x00"):
        with pytest.raises(AdapterError) as info:
            store.add(_vector(bad), persist=True)
        assert info.value.param == "name" and "invalid steering vector name" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_store_failed_write_leaves_store_unchanged(tmp_path: Path) -> None:
    store = VectorStore(tmp_path / "missing" / "dir")  # never created: the write fails
    with pytest.raises(OSError):
        store.add(_vector("lost"), persist=True)
    assert store.get("lost") is None
    store.add(_vector("lost"), persist=False)  # the name was released
    assert store.get("lost") is not None


def test_add_file_does_not_copy_or_delete(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    save_safetensors(_vector("x"), outside)
    directory = tmp_path / "store"
    store = VectorStore(directory)
    assert store.load_directory() == []
    loaded = store.add_file("cli", outside)
    assert loaded.name == "cli" and store.get("cli") is loaded
    assert not list(directory.iterdir())
    with pytest.raises(AdapterError) as info:
        store.add_file("cli2", tmp_path / "absent.gguf")
    assert info.value.status == 404
    assert store.remove("cli")
    assert outside.exists()


def test_load_directory_names_a_bad_file(tmp_path: Path) -> None:
    save_file({"direction.1": torch.tensor([float("nan")])}, tmp_path / "bad.safetensors")
    (tmp_path / "notes.txt").write_text("ignored: not a vector suffix")
    with pytest.raises(AdapterError, match="bad.safetensors: direction.1 contains NaN"):
        VectorStore(tmp_path).load_directory()


def test_too_many_layers_refused(tmp_path: Path) -> None:
    save_file({str(n): torch.zeros(1) for n in range(1025)}, tmp_path / "many.safetensors")
    _refused(tmp_path / "many.safetensors", "1025 directions, at most 1024")
    save_file({"direction.1024": torch.zeros(1)}, tmp_path / "far.safetensors")
    _refused(tmp_path / "far.safetensors", "layer index 1024 is beyond 1023")
