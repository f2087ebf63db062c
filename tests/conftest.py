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


@pytest.fixture(scope="session")
def llama(tokenizer) -> LoadedModel:
    return from_pretrained_objects(tiny_llama(len(tokenizer)), tokenizer, "tiny-llama")


@pytest.fixture(scope="session")
def llama_reference(tokenizer):
    """The same weights as `llama`, in a model no engine ever touched (HF generate oracle)."""
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def qwen2(tokenizer) -> LoadedModel:
    return from_pretrained_objects(tiny_qwen2(len(tokenizer)), tokenizer, "tiny-qwen2")


@pytest.fixture(scope="session")
def qwen2_reference(tokenizer):
    return tiny_qwen2(len(tokenizer))


@pytest.fixture(scope="session")
def gemma(tokenizer) -> LoadedModel:
    return from_pretrained_objects(tiny_gemma(len(tokenizer)), tokenizer, "tiny-gemma")


@pytest.fixture(scope="session")
def gemma_reference(tokenizer):
    return tiny_gemma(len(tokenizer))


@pytest.fixture(scope="session")
def gemma2(tokenizer) -> LoadedModel:
    return from_pretrained_objects(tiny_gemma2(len(tokenizer)), tokenizer, "tiny-gemma2")


@pytest.fixture(scope="session")
def gemma2_reference(tokenizer):
    return tiny_gemma2(len(tokenizer))


@pytest.fixture(scope="session")
def gemma3(tokenizer) -> LoadedModel:
    return from_pretrained_objects(tiny_gemma3(len(tokenizer)), tokenizer, "tiny-gemma3")


@pytest.fixture(scope="session")
def gemma3_reference(tokenizer):
    return tiny_gemma3(len(tokenizer))


@pytest.fixture(scope="session")
def phi3(tokenizer) -> LoadedModel:
    return from_pretrained_objects(tiny_phi3(len(tokenizer)), tokenizer, "tiny-phi3")


@pytest.fixture(scope="session")
def phi3_reference(tokenizer):
    return tiny_phi3(len(tokenizer))


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
