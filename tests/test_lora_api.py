"""LoRA adapters over HTTP: start-up and runtime loading, selection by model name, safety."""

from __future__ import annotations

import copy
import shutil
import threading

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.support import API_KEY, LiveServer
from tests.tiny_models import tiny_llama

CHAT = [{"role": "user", "content": "The capital of France is"}]


def save_adapter(base, path, seed: int, rank: int = 4) -> None:
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj",
                        "down_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(path)


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("adapter-root")
    base = tiny_llama(len(tokenizer))
    for i, name in enumerate(["first", "second", "third"]):
        save_adapter(base, root / name, seed=10 + i)
    save_adapter(base, root / "too-big", seed=5, rank=32)
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(root / "first" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded, ever")
    outside = tmp_path_factory.mktemp("outside")
    save_adapter(base, outside / "escape", seed=3)
    (root / "link").symlink_to(outside / "escape")
    return root


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, adapter_root):
    server = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                         "--dtype", "float32", "--lora", f"first={adapter_root / 'first'}",
                         "--adapter-dir", str(adapter_root), "--allow-runtime-lora",
                         "--max-loras", "2", "--max-lora-rank", "16"], api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(lora_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lora_server.base_url}/v1", api_key=API_KEY, max_retries=0)


def answer(client, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=CHAT, max_tokens=12,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert reply.model == model
    return reply.choices[0].message.content


def admin(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/{route}", json=body, headers=server.headers(),
                      timeout=60)


def test_models_list_adapters_with_parent(client):
    cards = {m.id: m for m in client.models.list().data}
    assert cards["first"].parent == "tiny" and cards["tiny"].parent is None


def test_adapter_changes_output_and_base_is_restored(client):
    base = answer(client, "tiny")
    adapted = answer(client, "first")
    assert adapted != base
    assert answer(client, "tiny") == base and answer(client, "first") == adapted


def test_runtime_load_use_and_unload(client, lora_server):
    response = admin(lora_server, "load_lora_adapter",
                     {"lora_name": "second", "lora_path": "second"})
    assert response.status_code == 200, response.text
    assert answer(client, "second") not in (answer(client, "tiny"), answer(client, "first"))
    assert admin(lora_server, "unload_lora_adapter", {"lora_name": "second"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        answer(client, "second")


def test_more_adapters_than_slots_in_one_batch(client, lora_server):
    """Two slots, three adapters requested at once: they queue for slots, all finish."""
    admin(lora_server, "load_lora_adapter", {"lora_name": "third", "lora_path": "third"})
    admin(lora_server, "load_lora_adapter", {"lora_name": "second", "lora_path": "second"})
    alone = {m: answer(client, m) for m in ("first", "second", "third")}
    results: dict[str, str] = {}
    threads = [threading.Thread(target=lambda m=m: results.__setitem__(m, answer(client, m)))
               for m in ("first", "second", "third") * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == alone


def test_unload_while_streaming_lets_the_request_finish(client, lora_server):
    stream = client.chat.completions.create(model="first", messages=CHAT, max_tokens=1500,
                                            stream=True, extra_body={"ignore_eos": True})
    first_chunk = next(stream)
    assert first_chunk.choices[0].delta.role == "assistant"
    assert admin(lora_server, "unload_lora_adapter", {"lora_name": "first"}).status_code == 200
    reasons = [c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason]
    assert reasons == ["length"]
    admin(lora_server, "load_lora_adapter", {"lora_name": "first", "lora_path": "first"})


@pytest.mark.parametrize(("body", "status", "text"), [
    ({"lora_name": "x", "lora_path": "../outside"}, 400, "outside"),
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "outside"),
    ({"lora_name": "x", "lora_path": "link"}, 400, "outside"),
    ({"lora_name": "x", "lora_path": "pickled"}, 400, "pickle"),
    ({"lora_name": "x", "lora_path": "too-big"}, 400, "rank"),
    ({"lora_name": "x", "lora_path": "missing"}, 404, "not"),
    ({"lora_name": "tiny", "lora_path": "second"}, 400, "base model"),
    ({"lora_name": "x"}, 400, "lora_path"),
])
def test_bad_runtime_loads_are_refused(lora_server, client, body, status, text):
    before = sorted(m.id for m in client.models.list().data)
    response = admin(lora_server, "load_lora_adapter", body)
    assert response.status_code == status, response.text
    assert text in response.json()["error"]["message"]
    assert sorted(m.id for m in client.models.list().data) == before


def test_unload_unknown_is_404(lora_server):
    assert admin(lora_server, "unload_lora_adapter", {"lora_name": "nope"}).status_code == 404


def test_runtime_lora_disabled_by_default(tiny_server):
    response = httpx.post(f"{tiny_server.base_url}/v1/load_lora_adapter",
                          json={"lora_name": "x", "lora_path": "y"},
                          headers=tiny_server.headers(), timeout=30)
    assert response.status_code == 403
