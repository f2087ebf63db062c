"""Lifecycle: clients that leave, SIGTERM with streams in flight, and restarts."""

from __future__ import annotations

import json
import signal
import time

import httpx
import pytest

from steerserve.server.app import build_context
from steerserve.server.settings import ServerSettings
from tests.inprocess import InProcessServer
from tests.support import API_KEY, LiveServer


def test_a_non_stream_client_that_leaves_frees_its_slot(llama):
    live = InProcessServer(build_context(ServerSettings(vectors_dir=None), llama))
    try:
        body = {"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 1900,
                "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            live.post("/v1/completions", body, timeout=0.5)  # the client gives up
        deadline = time.monotonic() + 10
        while live.engine.num_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.engine.num_running == 0
        assert live.engine.stats.finished.get("abort") == 1
        assert live.engine.stats.generation_tokens < 1900  # it did not run to the end
    finally:
        live.stop()


def stream_tokens(server: LiveServer, max_tokens: int, started: list) -> tuple[int, str]:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "temperature": 0}
    count, reason = 0, None
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body,
                      headers=server.headers(), timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                started.append(True)
                choice = json.loads(line[6:])["choices"][0]
                count += 1 if choice["text"] or choice["finish_reason"] is None else 0
                reason = choice["finish_reason"] or reason
    return count, reason


def test_sigterm_lets_streams_finish_and_refuses_new_work(tiny_model_dir):
    import threading

    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--dtype", "float32", "--drain-timeout", "60"], api_key=API_KEY)
    try:
        started: list = []
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(
            stream=stream_tokens(live, 1500, started)))
        thread.start()
        while not started:
            time.sleep(0.01)
        live.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            late = httpx.post(f"{live.base_url}/v1/completions", headers=live.headers(),
                              json={"model": "tiny", "prompt": "Hi", "max_tokens": 2},
                              timeout=10)
            assert late.status_code == 503, late.text  # never served during the drain
        except httpx.TransportError:
            pass  # or not even accepted: the listener is closed
        thread.join(120)
        assert result["stream"][1] == "length"  # the stream in flight ran to its end
        assert live.process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises it
    finally:
        live.stop()


def test_a_start_up_vector_deleted_and_extracted_again_restarts(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    vector_file = tmp_path / "start.safetensors"
    save_file({"direction.0": torch.ones(64)}, vector_file)
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--dtype",
            "float32", "--steering-vector", f"mood={vector_file}", "--vectors-dir",
            str(tmp_path / "vectors"), "--allow-runtime-vectors"]
    live = LiveServer(args, api_key=API_KEY)
    try:
        gone = httpx.delete(f"{live.base_url}/v1/steering/vectors/mood", headers=live.headers())
        assert gone.status_code == 200
        made = httpx.post(f"{live.base_url}/v1/steering/vectors", headers=live.headers(),
                          timeout=60, json={"name": "mood", "model": "tiny", "layers": [1],
                                            "positive": ["good", "fine"],
                                            "negative": ["bad", "poor"]})
        assert made.status_code == 200, made.text
    finally:
        live.stop()
    again = LiveServer(args, api_key=API_KEY)  # both a start-up file and a saved one: no crash
    try:
        card = httpx.get(f"{again.base_url}/v1/steering/vectors/mood",
                         headers=again.headers()).json()
        assert card["layers"] == [0]  # the file given at start wins
    finally:
        again.stop()
