"""Scale-out on Ray Serve: a local Ray cluster on this machine runs two replicas of a tiny
model behind Ray's HTTP proxy (`steerserve ray`), sharing one store directory. Requests reach
both replicas, streams stream, and a vector extracted, an adapter loaded or a temperature head
dropped into the store through or for one replica is used by every replica."""

from __future__ import annotations

import copy
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model

from steerserve.decoding.sampling.temperature_head import (
    TemperatureHead,
    TemperatureHeadConfig,
    save_temperature_head,
)
from tests.support import API_KEY, LiveServer
from tests.tiny_models import tiny_llama

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
REPLICA = "x-steerserve-replica"
PROMPT = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 8,
          "temperature": 0}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ray-adapters")
    torch.manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny_llama(len(tokenizer))), config).save_pretrained(
        root / "shared-adapter")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("shared-store")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, adapter_root, store):
    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--dtype", "float32", "--threads", "1", "--num-replicas", "2",
                       "--replica-cpus", "1", "--shared-store", str(store),
                       "--adapter-dir", str(adapter_root), "--allow-runtime-lora",
                       "--allow-runtime-vectors", "--max-num-seqs", "8"],
                      api_key=API_KEY, subcommand="ray", timeout=240)
    wait_for_replicas(live, 2, deadline=time.monotonic() + 180)
    yield live
    live.stop(timeout=60)
    assert live.process.returncode is not None


def wait_for_replicas(cluster, count: int, deadline: float) -> None:
    """/health answers once one replica is up; the second may still be loading."""
    seen = set()
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only replicas {sorted(seen)} came up"
        response = httpx.get(f"{cluster.base_url}/health", timeout=10)
        if response.status_code == 200:
            seen.add(response.headers[REPLICA])
        time.sleep(0.1)


def post(cluster, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{cluster.base_url}{path}", json=body, headers=HEADERS, timeout=60)


def answers_by_replica(cluster, body: dict, path: str = "/v1/completions",
                       tries: int = 40) -> dict[str, list[httpx.Response]]:
    """Concurrent requests until both replicas have answered at least twice (Ray picks the
    less loaded of two replicas, so concurrent requests spread over both)."""
    seen: dict[str, list[httpx.Response]] = {}
    with ThreadPoolExecutor(4) as pool:
        for _ in range(tries // 4):
            for response in pool.map(lambda _: post(cluster, path, body), range(4)):
                seen.setdefault(response.headers[REPLICA], []).append(response)
            if len(seen) == 2 and all(len(answers) >= 2 for answers in seen.values()):
                return seen
    raise AssertionError(f"requests reached {sorted(seen)} only")


def texts(seen: dict[str, list[httpx.Response]]) -> set[str]:
    for answers in seen.values():
        for response in answers:
            assert response.status_code == 200, response.text
    return {r.json()["choices"][0]["text"] for answers in seen.values() for r in answers}


def test_requests_reach_both_replicas_and_agree(cluster):
    seen = answers_by_replica(cluster, PROMPT)
    assert len(texts(seen)) == 1  # the same model on both: greedy answers are equal


def test_streaming_through_the_proxy(cluster):
    client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "Say something"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages,
                                                 max_tokens=12, temperature=0, stream=True))
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == "length"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                           temperature=0)
    assert streamed == whole.choices[0].message.content


def test_vector_extracted_through_one_replica_steers_through_every_replica(cluster, store):
    plain = texts(answers_by_replica(cluster, PROMPT))
    made = post(cluster, "/v1/steering/vectors", {
        "model": "tiny", "name": "shared-vec", "positive": ["good great", "joy love"],
        "negative": ["bad awful", "sad hate"]})
    assert made.status_code == 200, made.text
    assert (store / "vectors" / "shared-vec.safetensors").is_file()
    steered = {**PROMPT, "steering": [{"vector": "shared-vec", "scale": 8}]}
    answers = texts(answers_by_replica(cluster, steered))
    assert len(answers) == 1 and answers != plain

    gone = httpx.delete(f"{cluster.base_url}/v1/steering/vectors/shared-vec", headers=HEADERS)
    assert gone.status_code == 200
    for answers in answers_by_replica(cluster, steered).values():
        for response in answers:
            assert response.status_code == 404 and "shared-vec" in response.text


def test_runtime_adapter_load_reaches_every_replica(cluster, store):
    loaded = post(cluster, "/v1/load_lora_adapter",
                  {"lora_name": "shared-adapter", "lora_path": "shared-adapter"})
    assert loaded.status_code == 200, loaded.text
    assert (store / "loras" / "shared-adapter.json").is_file()
    plain = texts(answers_by_replica(cluster, PROMPT))
    adapted = texts(answers_by_replica(cluster, {**PROMPT, "model": "shared-adapter"}))
    assert len(adapted) == 1 and adapted != plain

    assert post(cluster, "/v1/unload_lora_adapter",
                {"lora_name": "shared-adapter"}).status_code == 200
    for answers in answers_by_replica(cluster, {**PROMPT, "model": "shared-adapter"}).values():
        for response in answers:
            assert response.status_code == 404


def test_temperature_head_dropped_into_the_store_serves_every_replica(cluster, store):
    head = TemperatureHead(TemperatureHeadConfig(64, (0.0, 1.0)))
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.copy_(torch.tensor([5.0, -5.0]))  # always temperature 0
    save_temperature_head(head, store / "writing.safetensors")
    shutil.move(store / "writing.safetensors", store / "heads" / "greedy.safetensors")
    body = {**{k: v for k, v in PROMPT.items() if k != "temperature"}, "seed": 1,
            "adaptive_temperature": {"method": "learned", "head": "greedy"}}
    answers = texts(answers_by_replica(cluster, body))
    assert answers == texts(answers_by_replica(cluster, PROMPT))  # greedy everywhere
