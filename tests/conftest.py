"""Shared fixtures: tiny models (fast), the embedded SmolLM2 (slow), live servers."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when it is first imported (transformers may import it), so
# the kernel tests' CPU interpreter must be chosen here, before anything else loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from support import API_KEY, LiveServer  # noqa: E402
from tiny_models import tiny_llama, tiny_qwen2, tiny_tokenizer  # noqa: E402

from steerserve.decoding.model.loader import LoadedModel, from_pretrained_objects, load_model  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def llama(tokenizer) -> LoadedModel:
    return from_pretrained_objects(tiny_llama(len(tokenizer)), tokenizer, "tiny-llama")


@pytest.fixture(scope="session")
def qwen2(tokenizer) -> LoadedModel:
    return from_pretrained_objects(tiny_qwen2(len(tokenizer)), tokenizer, "tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("SmolLM2-135M-Instruct", dtype="float32", max_model_len=1024)


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
