"""--shared-store without Ray: two independent servers over one store directory (what a
Kubernetes Deployment behind a Service runs) see each other's vectors, including replacing
and deleting one; names never leave the store, and a bad file in it harms no route."""

from __future__ import annotations

import copy
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.support import API_KEY, LiveServer
from tests.tiny_models import tiny_llama

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 8,
        "temperature": 0, "steering": [{"vector": "mood", "scale": 8}]}


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    servers = [LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                           "--dtype", "float32", "--shared-store", str(store),
                           "--allow-runtime-vectors"], api_key=API_KEY) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


def extract(server, positive: list[str], negative: list[str]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/steering/vectors", headers=HEADERS, timeout=60,
                      json={"model": "tiny", "name": "mood", "positive": positive,
                            "negative": negative, "method": "mean_diff"})


def complete(server) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", json=BODY, headers=HEADERS,
                      timeout=60)


def test_a_vector_written_by_one_server_is_used_replaced_and_deleted_on_the_other(pair):
    first, second = pair
    assert complete(second).status_code == 404
    assert extract(first, ["good great"], ["bad awful"]).status_code == 200
    steered = [complete(server) for server in pair]
    assert [r.status_code for r in steered] == [200, 200]
    assert steered[0].json()["choices"][0]["text"] == steered[1].json()["choices"][0]["text"]

    # Deleted through the second, re-extracted with other texts through the second: the first
    # drops its copy and reads the new file.
    assert httpx.delete(f"{second.base_url}/v1/steering/vectors/mood",
                        headers=HEADERS).status_code == 200
    assert complete(first).status_code == 404
    assert extract(second, ["sea boat", "fish wave"], ["dry sand", "dust rock"]).status_code \
        == 200
    again = [complete(server).json()["choices"][0]["text"] for server in pair]
    assert again[0] == again[1] != steered[0].json()["choices"][0]["text"]


# ---- names that become files, and store files that are not what they should be ------------------
def store_layout(base, tokenizer, seed: int):
    """base/store, base/adapters (with a PEFT adapter "one") and base/outside."""
    store, adapters, outside = base / "store", base / "adapters", base / "outside"
    outside.mkdir()
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny_llama(len(tokenizer))), config).save_pretrained(
        adapters / "one")
    return store, adapters, outside


@pytest.fixture(scope="module")
def admin(tiny_model_dir, tmp_path_factory, tokenizer):
    """A server with runtime adapters over a store; `outside` is a directory beside the store
    that no request may touch."""
    store, adapters, outside = store_layout(tmp_path_factory.mktemp("names"), tokenizer, 3)
    (outside / "victim.json").write_text('{"keep": true}')
    server = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                         "--dtype", "float32", "--shared-store", str(store),
                         "--allow-runtime-lora", "--adapter-dir", str(adapters),
                         "--allow-runtime-vectors"], api_key=API_KEY)
    yield server, store, outside
    server.stop()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers=HEADERS, timeout=60)


def files_under(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("name", ["../outside/victim", "../../victim", "a/b", "..", ".hidden",
                                  "x" * 129, "ok\nname"])
def test_an_adapter_name_that_is_not_a_name_changes_nothing(admin, name):
    server, store, outside = admin
    before = files_under(store.parent)
    for path, body in (("/v1/load_lora_adapter", {"lora_name": name, "lora_path": "one"}),
                       ("/v1/unload_lora_adapter", {"lora_name": name})):
        reply = post(server, path, body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "lora_name"
    assert files_under(store.parent) == before
    models = httpx.get(f"{server.base_url}/v1/models", headers=HEADERS).json()["data"]
    assert [m["id"] for m in models] == ["tiny"]


def test_unloading_what_is_not_loaded_deletes_nothing(admin):
    server, store, _ = admin
    record = store / "loras" / "ghost.json"
    record.write_text('{"path": "nowhere"}')  # a record this replica could not load
    reply = post(server, "/v1/unload_lora_adapter", {"lora_name": "ghost"})
    assert reply.status_code == 404 and record.exists()
    record.unlink()


def test_a_bad_store_file_is_skipped_reported_and_harms_no_route(admin):
    server, store, _ = admin
    (store / "loras" / "list.json").write_text("[1, 2]")  # valid JSON, not an object
    (store / "loras" / "torn.json").write_text('{"pa')
    (store / "vectors" / "broken.safetensors").write_bytes(b"not a tensor file")
    for _ in range(2):  # the second request finds the same files: still fine
        reply = post(server, "/v1/completions", {"model": "tiny", "prompt": "Hi",
                                                 "max_tokens": 2})
        assert reply.status_code == 200, reply.text
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "good",
                                                  "lora_path": "one"}).status_code == 200
    status = httpx.get(f"{server.base_url}/v1/shared_store", headers=HEADERS).json()
    assert set(status["skipped"]) >= {"loras/list.json", "loras/torn.json",
                                      "vectors/broken.safetensors"}
    assert "path" in status["skipped"]["loras/list.json"]
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    for file in ("list.json", "torn.json"):
        (store / "loras" / file).unlink()
    (store / "vectors" / "broken.safetensors").unlink()


@pytest.fixture(scope="module")
def churn_pair(tiny_model_dir, tmp_path_factory, tokenizer):
    """Two servers with runtime adapters and vectors over one store."""
    store, adapters, outside = store_layout(tmp_path_factory.mktemp("churn"), tokenizer, 4)
    (outside / "keep.json").write_text("{}")
    servers = [LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                           "--dtype", "float32", "--shared-store", str(store),
                           "--allow-runtime-lora", "--adapter-dir", str(adapters),
                           "--allow-runtime-vectors"], api_key=API_KEY) for _ in range(2)]
    yield servers, store, outside
    for server in servers:
        server.stop()


def churn_traffic(servers, stop: threading.Event, statuses: list[int]) -> None:
    """Plain, adapter and steered chats on both servers until stopped."""
    bodies = [{"model": "tiny"}, {"model": "churn"},
              {"model": "tiny", "steering": [{"vector": "churnv", "scale": 2.0}]}]
    for i in itertools.count():
        if stop.is_set():
            return
        body = {**bodies[i % 3], "messages": [{"role": "user", "content": f"Hi {i}"}],
                "max_tokens": 4, "stream": i % 2 == 0}
        statuses.append(post(servers[i % 2], "/v1/chat/completions", body).status_code)


def test_adapter_and_vector_churn_across_two_servers_under_traffic(churn_pair):
    """Loads, unloads, extractions and deletions through alternating servers while chats
    run on both: every request answered, none with a 5xx (a churned name may be a 4xx while
    it is gone), the two servers agree at the end, and nothing outside the store changed."""
    servers, store, outside = churn_pair
    before = files_under(outside)
    statuses: list[int] = []
    operations: list[int] = []
    stop = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        traffic = [pool.submit(churn_traffic, servers, stop, statuses) for _ in range(2)]
        for round_index in range(6):
            first, second = servers[round_index % 2], servers[1 - round_index % 2]
            operations += [
                post(first, "/v1/load_lora_adapter", {"lora_name": "churn",
                                                       "lora_path": "one"}).status_code,
                extract_named(second, "churnv").status_code,
                post(second, "/v1/unload_lora_adapter", {"lora_name": "churn"}).status_code,
                httpx.delete(f"{first.base_url}/v1/steering/vectors/churnv", headers=HEADERS,
                             timeout=60).status_code]
        stop.set()
        for done in traffic:
            done.result(120)
    assert statuses and all(status < 500 for status in statuses), statuses
    assert statuses.count(200) > len(statuses) // 3
    assert all(status < 500 for status in operations) and operations.count(200) >= 12
    models = [httpx.get(f"{s.base_url}/v1/models", headers=HEADERS).json()["data"]
              for s in servers]
    assert [m["id"] for m in models[0]] == [m["id"] for m in models[1]]
    assert files_under(outside) == before
    assert not [p for p in store.rglob(".*")]  # no temporary file left behind


def extract_named(server, name: str) -> httpx.Response:
    return post(server, "/v1/steering/vectors", {
        "model": "tiny", "name": name, "positive": ["good great"], "negative": ["bad awful"],
        "method": "mean_diff"})
