"""vLLM-shaped tokenizer routes (what lm-evaluation-harness auto-detects), at the root and
under /v1, behind the API key, checked against the model's own tokenizer."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from steerserve.server.app import build_context
from steerserve.server.schemas.tokenizer import MAX_TOKENIZE_CHARS
from steerserve.server.settings import ServerSettings
from tests.inprocess import InProcessServer


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_detokenize_and_info(tiny_server, tokenizer, prefix):
    url, headers = tiny_server.base_url + prefix, tiny_server.headers()
    text = "Once upon a time"
    out = httpx.post(f"{url}/tokenize", headers=headers, timeout=30,
                     json={"prompt": text, "add_special_tokens": False,
                           "return_token_strs": True}).json()
    assert out["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] > 0
    assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
    back = httpx.post(f"{url}/detokenize", headers=headers, json={"tokens": out["tokens"]},
                      timeout=30).json()
    assert back == {"prompt": tokenizer.decode(out["tokens"])}
    info = httpx.get(f"{url}/tokenizer_info", headers=headers, timeout=30).json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert "chat_template" in info and "pad_token" in info


def test_messages_go_through_the_chat_template(tiny_server, tokenizer):
    messages = [{"role": "user", "content": "Hi there"}]
    out = httpx.post(f"{tiny_server.base_url}/tokenize", headers=tiny_server.headers(),
                     json={"messages": messages}, timeout=30).json()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out["tokens"] == tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("path,body,param", [
    ("/detokenize", {"tokens": [1, 10**9]}, "tokens.1"),
    ("/detokenize", {"tokens": [-1]}, "tokens.0"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, "model"),
    ("/tokenize", {"prompt": "a", "typo": 1}, "typo"),
])
def test_bad_input_is_a_4xx_naming_the_field(tiny_server, path, body, param):
    response = httpx.post(f"{tiny_server.base_url}{path}", headers=tiny_server.headers(),
                          json=body, timeout=30)
    assert 400 <= response.status_code < 500
    assert response.json()["error"]["param"] == param


def test_the_api_key_is_required(tiny_server):
    assert httpx.get(f"{tiny_server.base_url}/tokenizer_info", timeout=30).status_code == 401
    assert httpx.post(f"{tiny_server.base_url}/v1/tokenize", json={"prompt": "a"},
                      timeout=30).status_code == 401


def test_inputs_are_bounded(tiny_server):
    url, headers = tiny_server.base_url, tiny_server.headers()
    big = "a" * (MAX_TOKENIZE_CHARS + 1)
    for body, param in (({"prompt": big}, "prompt"),
                        ({"messages": [{"role": "user", "content": big}]}, "messages")):
        reply = httpx.post(f"{url}/tokenize", headers=headers, json=body, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_a_busy_tokenizer_route_never_holds_up_generation(llama):
    """While the tokenizer routes' worker is held, a chat is parsed, run and answered, and a
    /tokenize waits for its own worker; released, it answers too."""
    server = InProcessServer(build_context(ServerSettings(vectors_dir=None), llama))
    held, release = threading.Event(), threading.Event()
    server.ctx.tokenizer_worker.submit(lambda: (held.set(), release.wait(60)))
    held.wait(10)
    try:
        with ThreadPoolExecutor(1) as pool:
            tokenized = pool.submit(server.post, "/tokenize", {"prompt": "Hello there"})
            chat = server.post("/v1/chat/completions", {
                "model": llama.name, "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3})
            assert chat.status_code == 200 and not tokenized.done()
            release.set()
            assert tokenized.result(60).json()["count"] > 0
    finally:
        release.set()
        server.stop()
