"""Faults during traffic: a steering vector deleted while requests use it, a corrupt adapter
loaded while others stream, an adapter unloaded mid-stream. (An exception inside the engine
step: tests/test_isolation.py; SIGTERM with streams in flight: tests/test_lifecycle.py.)"""

from __future__ import annotations

import copy
import threading

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from tests.support import API_KEY, LiveServer
from tests.tiny_models import tiny_llama

LONG = 1500  # tokens: the stream is still running when the fault comes


@pytest.fixture(scope="module")
def server(tiny_model_dir, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny_llama(len(tokenizer))), config).save_pretrained(
        root / "good")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text((root / "good" /
                                                           "adapter_config.json").read_text())
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # not a file
    save_file({"direction.0": torch.randn(64)}, root / "vec.safetensors")
    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--dtype",
                       "float32", "--adapter-dir", str(root), "--allow-runtime-lora",
                       "--lora", f"good={root / 'good'}", "--steering-vector",
                       f"vec={root / 'vec.safetensors'}", "--allow-runtime-vectors"],
                      api_key=API_KEY)
    yield live
    live.stop()


def body(**fields) -> dict:
    return {"model": "tiny", "prompt": "Once upon a time", "temperature": 0,
            "ignore_eos": True, **fields}


def streamed(server, fields: dict, first: threading.Event, out: dict) -> None:
    text, reason = "", None
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body(
            stream=True, **fields), headers=server.headers(), timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                first.set()
                choice = httpx.Response(200, content=line[6:]).json()["choices"][0]
                text += choice["text"]
                reason = choice["finish_reason"] or reason
    out.update(text=text, reason=reason)


def in_flight(server, fields: dict) -> tuple[threading.Thread, dict]:
    first, out = threading.Event(), {}
    thread = threading.Thread(target=streamed, args=(server, fields, first, out))
    thread.start()
    assert first.wait(60)
    return thread, out


def post(server, path: str, payload: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=payload, headers=server.headers(),
                      timeout=60)


def test_a_vector_deleted_in_use_leaves_its_requests_unchanged(server):
    steering = {"steering": [{"vector": "vec", "scale": 3.0}], "max_tokens": LONG}
    expected = post(server, "/v1/completions", body(**steering)).json()["choices"][0]["text"]
    thread, out = in_flight(server, steering)
    gone = httpx.delete(f"{server.base_url}/v1/steering/vectors/vec", headers=server.headers())
    assert gone.status_code == 200
    thread.join(120)
    assert out == {"text": expected, "reason": "length"}  # it kept its own tensors
    after = post(server, "/v1/completions", body(**steering))
    assert after.status_code == 404 and after.json()["error"]["param"] == "steering.0.vector"


def test_a_corrupt_adapter_loaded_during_traffic_changes_nothing(server):
    expected = post(server, "/v1/completions", body(max_tokens=LONG)).json()["choices"][0]
    thread, out = in_flight(server, {"max_tokens": LONG})
    refused = post(server, "/v1/load_lora_adapter", {"lora_name": "bad",
                                                     "lora_path": "corrupt"})
    assert refused.status_code == 400, refused.text
    thread.join(120)
    assert out == {"text": expected["text"], "reason": "length"}
    models = httpx.get(f"{server.base_url}/v1/models", headers=server.headers()).json()
    assert "bad" not in [m["id"] for m in models["data"]]
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_an_adapter_unloaded_mid_stream_lets_it_finish(server):
    fields = {"model": "good", "max_tokens": LONG}
    expected = post(server, "/v1/completions", body(**fields)).json()["choices"][0]["text"]
    thread, out = in_flight(server, fields)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "good"}).status_code == 200
    thread.join(120)
    assert out == {"text": expected, "reason": "length"}
    assert post(server, "/v1/completions", body(**fields)).status_code == 404
