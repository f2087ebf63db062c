"""--shared-store without Ray: two independent servers over one store directory (what a
Kubernetes Deployment behind a Service runs) see each other's vectors, including replacing
and deleting one."""

from __future__ import annotations

import httpx
import pytest

from tests.support import API_KEY, LiveServer

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
