"""Shared fixtures: tiny models (fast), the embedded SmolLM2 (slow), live servers."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

# No test may write to the user's home directory (default settings put vectors under ~):
# every test, and every server it starts, sees a throwaway home.
os.environ["HOME"] = tempfile.mkdtemp(prefix="steerserve-test-home-")

# Triton reads TRITON_INTERPRET when it is first imported (transformers may import it), so
# the kernel tests' CPU interpreter must be chosen here, before anything else loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Where the tiny models run: cpu here and in CI; STEERSERVE_TEST_DEVICE=cuda runs the engine's
# tests natively on a lent GPU (the engine, its forward and its references on the same device).
TEST_DEVICE = torch.device(os.environ.get("STEERSERVE_TEST_DEVICE", "cpu"))

from steerserve.decoding.model.loader import LoadedModel, from_pretrained_objects, load_model  # noqa: E402
from tests.support import API_KEY, LiveServer  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    tiny_gemma,
    tiny_gemma2,
    tiny_gemma3,
    tiny_llama,
    tiny_phi3,
    tiny_qwen2,
    tiny_tokenizer,
)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


def _tiny_model_fixtures(name: str, build):
    """Session fixtures `name` (the model, loaded for engines) and `name_reference`: the same
    weights in a model no engine ever touches (the HF `generate` oracle)."""

    @pytest.fixture(scope="session", name=name)
    def loaded(tokenizer) -> LoadedModel:
        model = build(len(tokenizer)).to(TEST_DEVICE)
        return from_pretrained_objects(model, tokenizer, f"tiny-{name}")

    @pytest.fixture(scope="session", name=f"{name}_reference")
    def reference(tokenizer):
        return build(len(tokenizer)).to(TEST_DEVICE)

    return loaded, reference


llama, llama_reference = _tiny_model_fixtures("llama", tiny_llama)
qwen2, qwen2_reference = _tiny_model_fixtures("qwen2", tiny_qwen2)
gemma, gemma_reference = _tiny_model_fixtures("gemma", tiny_gemma)
gemma2, gemma2_reference = _tiny_model_fixtures("gemma2", tiny_gemma2)
gemma3, gemma3_reference = _tiny_model_fixtures("gemma3", tiny_gemma3)
phi3, phi3_reference = _tiny_model_fixtures("phi3", tiny_phi3)  # no own forward: the modules


@pytest.fixture(scope="session")
def smollm2_pair() -> tuple[LoadedModel, torch.nn.Module]:
    """The embedded model, and a copy taken before any engine installs its hooks."""
    loaded = load_model("SmolLM2-135M-Instruct", dtype="float32", max_model_len=1024)
    return loaded, copy.deepcopy(loaded.model)


@pytest.fixture(scope="session")
def smollm2(smollm2_pair) -> LoadedModel:
    return smollm2_pair[0]


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_pair) -> torch.nn.Module:
    return smollm2_pair[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, llama, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    llama.model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    server = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                         "--dtype", "float32", "--max-num-seqs", "16", "--max-n", "8"],
                        api_key=API_KEY)
    yield server
    server.stop()
