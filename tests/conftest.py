"""Shared fixtures: tiny models (fast), the embedded SmolLM2 (slow), live servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when it is first imported (transformers may import it), so
# the kernel tests' CPU interpreter must be chosen here, before anything else loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import httpx  # noqa: E402
import pytest  # noqa: E402
from tiny_models import tiny_llama, tiny_qwen2, tiny_tokenizer  # noqa: E402

from decoding.engine import Engine, EngineConfig  # noqa: E402
from decoding.model_loader import LoadedModel, from_pretrained_objects, load_model  # noqa: E402

API_KEY = "test-key"


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


def make_engine(model: LoadedModel, **config) -> Engine:
    return Engine(model, EngineConfig(**{"max_num_seqs": 8, **config}))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, llama, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    llama.model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A real `steerserve serve` subprocess on 127.0.0.1."""

    def __init__(self, args: list[str], api_key: str | None = None, timeout: float = 300):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port),
                   "--log-level", "warning", *args]
        if api_key:
            command += ["--api-key", api_key]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("TRITON_INTERPRET", None)  # the server picks kernels for its own device
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir):
    server = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                         "--dtype", "float32", "--max-num-seqs", "16", "--max-n", "8"],
                        api_key=API_KEY)
    yield server
    server.stop()
