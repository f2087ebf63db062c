"""Adaptive temperature over HTTP: reported temperatures (JSON and stream), llama.cpp's
fields, learned heads loaded at start, and refused parameters."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from steerserve.decoding.sampling.temperature_head import (
    TemperatureHead,
    TemperatureHeadConfig,
    save_temperature_head,
)
from tests.support import API_KEY, LiveServer

TEMPERATURES = (0.0, 0.5, 1.0)


def head_file(path, hidden_size: int, favourite: int):
    head = TemperatureHead(TemperatureHeadConfig(hidden_size, TEMPERATURES))
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.fill_(-5.0)
        head.net.bias[favourite] = 5.0
    save_temperature_head(head, path)
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--dtype", "float32",
                       "--temperature-head", f"cool={head_file(root / 'cool.safetensors', 64, 0)}",
                       "--temperature-head", f"warm={head_file(root / 'warm.safetensors', 64, 2)}"],
                      api_key=API_KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)


def chat(client, stream: bool = False, **extra):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=8,
        seed=3, stream=stream, extra_body={"ignore_eos": True, **extra})


def test_temperatures_reported_in_json_and_stream(client):
    rule = {"adaptive_temperature": {"method": "edt", "theta": 0.5}, "return_temperatures": True}
    whole = chat(client, **rule).choices[0]
    temps = whole.model_extra["temperatures"]
    assert len(temps) == 8 and all(0.0 < t <= 1.0 for t in temps)
    streamed = [t for chunk in chat(client, stream=True, **rule) if chunk.choices
                for t in chunk.choices[0].model_extra.get("temperatures", [])]
    assert streamed == pytest.approx(temps, rel=1e-6)
    plain = chat(client).choices[0]
    assert "temperatures" not in plain.model_extra


def test_completions_report_fixed_temperature(client):
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0.3,
                                    extra_body={"return_temperatures": True, "ignore_eos": True})
    assert out.choices[0].model_extra["temperatures"] == [pytest.approx(0.3)] * 4


def test_llama_cpp_dynatemp_fields(client):
    ours = chat(client, adaptive_temperature={"method": "dynatemp", "range": 0.5,
                                              "exponent": 2.0}, return_temperatures=True)
    theirs = chat(client, dynatemp_range=0.5, dynatemp_exponent=2.0, return_temperatures=True)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    temps = theirs.choices[0].model_extra["temperatures"]
    assert all(0.5 <= t <= 1.5 for t in temps) and len(set(temps)) > 1


def test_learned_heads_pick_their_temperature(client):
    cool = chat(client, adaptive_temperature={"method": "learned", "head": "cool"},
                return_temperatures=True).choices[0]
    greedy = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=8,
        temperature=0, extra_body={"ignore_eos": True}).choices[0]
    assert cool.model_extra["temperatures"] == [0.0] * 8
    assert cool.message.content == greedy.message.content
    warm = chat(client, adaptive_temperature={"method": "learned", "head": "warm",
                                              "level": "sequence", "choice": "sample"},
                return_temperatures=True).choices[0]
    assert warm.model_extra["temperatures"] == [1.0] * 8


BAD = [
    ({"adaptive_temperature": {"method": "edt", "t0": -0.1}}, 400, "adaptive_temperature.t0"),
    ({"adaptive_temperature": {"method": "edt", "n": 1.5}}, 400, "adaptive_temperature.n"),
    ({"adaptive_temperature": {"method": "edt", "theta": 0}}, 400, "adaptive_temperature.theta"),
    ({"adaptive_temperature": {"method": "edt", "range": 0.3}}, 400,
     "adaptive_temperature.range"),
    ({"adaptive_temperature": {"method": "dynatemp", "head": "cool"}}, 400,
     "adaptive_temperature.head"),
    ({"adaptive_temperature": {"method": "learned"}}, 400, "adaptive_temperature.head"),
    ({"adaptive_temperature": {"method": "learned", "head": "nope"}}, 404,
     "adaptive_temperature.head"),
    ({"adaptive_temperature": {"method": "learned", "head": "cool", "level": "word"}}, 400,
     "adaptive_temperature.level"),
    ({"adaptive_temperature": {"method": "mirostat"}}, 400, "adaptive_temperature.method"),
    ({"adaptive_temperature": {"method": "learned", "head": "cool"}, "temperature": 0.5}, 400,
     "temperature"),
    ({"adaptive_temperature": {"method": "edt"}, "dynatemp_range": 0.2}, 400, "dynatemp_range"),
    ({"dynatemp_range": -1}, 400, "dynatemp_range"),
    ({"return_temperatures": [1]}, 400, "return_temperatures"),
]


@pytest.mark.parametrize(("extra", "status", "param"), BAD)
def test_bad_parameters_are_refused(server, extra, status, param):
    response = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers(),
                          json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                **extra}, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_nan_is_refused(server):
    raw = ('{"model": "tiny", "prompt": "Hi", "adaptive_temperature": '
           '{"method": "edt", "theta": NaN}}')
    response = httpx.post(f"{server.base_url}/v1/completions", content=raw, timeout=30,
                          headers={**server.headers(), "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("adaptive_temperature.theta")


def test_head_of_another_hidden_size_is_refused_at_start(tiny_model_dir, tmp_path):
    path = head_file(tmp_path / "wide.safetensors", 128, 0)
    with pytest.raises(RuntimeError, match="hidden size"):
        LiveServer(["--model", str(tiny_model_dir), "--temperature-head", f"wide={path}"],
                   timeout=120)
