"""The OpenAI API against a live server on 127.0.0.1, through the official client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.support import API_KEY

CHAT = [{"role": "user", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key=API_KEY, max_retries=0)


def sse_events(server, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{server.base_url}{path}", json=body, headers=server.headers(),
                      timeout=60) as response:
        assert response.status_code == 200
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_completion_shape_and_usage(client):
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                           temperature=0)
    assert reply.id and reply.object == "chat.completion" and reply.created > 0
    assert reply.model == "tiny"
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens <= 8
    assert usage.prompt_tokens + usage.completion_tokens == usage.total_tokens


def test_stream_joins_to_the_non_stream_text(client):
    args = dict(model="tiny", messages=CHAT, max_tokens=16, temperature=0,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert reasons == ["length"] and chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert all(c.usage is None for c in chunks)


def test_stream_ends_with_done_and_usage_chunk(tiny_server):
    events = sse_events(tiny_server, "/v1/chat/completions", {
        "model": "tiny", "messages": CHAT, "max_tokens": 5, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True})
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["choices"] == []
    assert final["usage"]["completion_tokens"] == 5
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + 5


def test_n_choices_stream_interleaved_by_index(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=6, n=3, stream=True, temperature=1.0, seed=3,
        extra_body={"ignore_eos": True}))
    finishes = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role]
    assert sorted(roles) == [0, 1, 2]
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, n=3,
                                           temperature=1.0, seed=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]


def test_seed_reproducible_over_http(client):
    args = dict(model="tiny", messages=CHAT, max_tokens=12, temperature=1.0, seed=42,
                extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**args).choices[0].message.content
    assert client.chat.completions.create(**args).choices[0].message.content == first


def test_stop_string_excluded(client):
    args = dict(model="tiny", messages=CHAT, max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**args).choices[0].message.content
    stop = full[8:11]
    reply = client.chat.completions.create(stop=[stop], **args)
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(stop=[stop], stream=True, **args)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(stop)]


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=3,
                                           extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    plain = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completions_text_and_token_prompts(client, tokenizer):
    text = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                                     temperature=0, extra_body={"ignore_eos": True})
    ids = tokenizer("Once upon a time")["input_ids"]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert text.choices[0].text == by_ids.choices[0].text
    assert text.usage.prompt_tokens == len(ids) and text.usage.completion_tokens == 5
    two = client.completions.create(model="tiny", prompt=["Hello", "One, two"], max_tokens=3,
                                    n=2, temperature=0)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]


def test_token_counters_follow_the_requests(client, tiny_server):
    before = {name: tiny_server.metric(name) for name in (
        "steerserve_prompt_tokens_total", "steerserve_generation_tokens_total")}
    reply = client.completions.create(model="tiny", prompt=[1, 5, 9, 13, 4, 22, 40],
                                      max_tokens=3, temperature=0, n=2,
                                      extra_body={"ignore_eos": True})
    assert tiny_server.metric("steerserve_prompt_tokens_total") - \
        before["steerserve_prompt_tokens_total"] == 2 * 7  # each choice prefills its prompt
    assert tiny_server.metric("steerserve_generation_tokens_total") - \
        before["steerserve_generation_tokens_total"] == reply.usage.completion_tokens == 6


def test_echo_logprobs_score_the_prompt(client):
    reply = client.completions.create(model="tiny", prompt="The capital of France is",
                                      max_tokens=0, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == "The capital of France is"
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens) == choice.text
    assert reply.usage.completion_tokens == 0


def test_completion_stream(client):
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=4,
                                            stream=True, temperature=0,
                                            extra_body={"ignore_eos": True}))
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert sum(1 for c in chunks if c.choices[0].finish_reason) == 1


def test_api_key_required(tiny_server):
    url = f"{tiny_server.base_url}/v1/chat/completions"
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 1}
    missing = httpx.post(url, json=body, timeout=30)
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_client_disconnect_frees_the_slot(tiny_server):
    aborted = tiny_server.metric('steerserve_requests_finished_total{reason="abort"}') \
        if _has_metric(tiny_server, "abort") else 0.0
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 1800, "n": 4, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{tiny_server.base_url}/v1/chat/completions", json=body,
                      headers=tiny_server.headers(), timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(12):
            next(lines)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if tiny_server.metric("steerserve_requests_running") == 0:
            break
        time.sleep(0.1)
    assert tiny_server.metric("steerserve_requests_running") == 0
    assert tiny_server.metric('steerserve_requests_finished_total{reason="abort"}') >= aborted + 4
    assert httpx.get(f"{tiny_server.base_url}/health", timeout=5).status_code == 200


def _has_metric(server, reason: str) -> bool:
    text = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    return f'reason="{reason}"' in text
