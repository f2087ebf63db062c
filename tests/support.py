"""Test support shared across modules: engines, free ports, live server subprocesses.
(Kept out of conftest.py: two conftest modules exist, and importing one by name is ambiguous.)"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import httpx

from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.model.loader import LoadedModel

API_KEY = "test-key"


REPO = Path(__file__).resolve().parent.parent


def load_script(relative: str) -> ModuleType:
    """A script of the repository's (benchmarks/, examples/) as a module, loaded from its
    file: scripts are not packages, and nothing is added to sys.path."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses in it look their module up by name
    spec.loader.exec_module(module)
    return module


def make_engine(model: LoadedModel, **config) -> Engine:
    return Engine(model, EngineConfig(**{"max_num_seqs": 8, **config}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A real `steerserve serve` subprocess on 127.0.0.1."""

    def __init__(self, args: list[str], api_key: str | None = None, timeout: float = 300,
                 subcommand: str = "serve"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        command = [sys.executable, "-m", "steerserve.server.cli", subcommand, "--port",
                   str(self.port), "--log-level", "warning", *args]
        if api_key:
            command += ["--api-key", api_key]
        if "--vectors-dir" not in args:  # never the user's own directory
            command += ["--vectors-dir", "none"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("TRITON_INTERPRET", None)  # the server picks kernels for its own device
        # A file, not a pipe: a chatty server (Ray's) would block on a full pipe.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server)
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                        stderr=self.log, text=True)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.stderr()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.base_url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self, timeout: float = 20) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
        log_dir = os.environ.get("STEERSERVE_TEST_LOGS")  # debugging aid: keep the server log
        if log_dir:
            Path(log_dir, f"server-{self.port}.log").write_text(self.stderr())
