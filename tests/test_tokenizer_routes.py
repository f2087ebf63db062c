"""vLLM-shaped tokenizer routes (what lm-evaluation-harness auto-detects), at the root and
under /v1, behind the API key, checked against the model's own tokenizer."""

from __future__ import annotations

import httpx
import pytest


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
