"""In-context alignment (URIAL): chat rendered through the constant prefix, per request and as
the server's default, against prompts written out in the test and sent as completions."""

from __future__ import annotations

import openai
import pytest

from steerserve.server.app import build_context
from steerserve.server.settings import ServerSettings
from steerserve.server.translate.alignment import URIAL_PREFIX, URIAL_STOP
from tests.inprocess import InProcessServer

QUESTION = "Where do rivers end?"
GREEDY = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def urial_server(llama):
    """URIAL by default; request templates allowed, so their clash with it can be asked for."""
    ctx = build_context(ServerSettings(vectors_dir=None, max_num_seqs=4,
                                       in_context_alignment="urial",
                                       allow_request_chat_template=True), llama)
    live = InProcessServer(ctx)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(urial_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{urial_server.base_url}/v1", api_key="x", max_retries=0)


def chat(client, messages: list[dict], **fields) -> str:
    args = {**GREEDY, "extra_body": {**GREEDY["extra_body"], **fields}}
    return client.chat.completions.create(model="tiny-llama", messages=messages,
                                          **args).choices[0].message.content


def completion(client, prompt: str, stop: list[str] | None) -> str:
    return client.completions.create(model="tiny-llama", prompt=prompt, stop=stop,
                                     **GREEDY).choices[0].text


def written(*turns: tuple[str, str]) -> str:
    """The URIAL conversation as the paper's format writes it, opened for the next answer."""
    sections = {"system": "# Note:\n{}\n\n", "user": "# Query:\n```\n{}\n```\n\n",
                "assistant": "# Answer:\n```\n{}\n```\n\n"}
    body = "".join(sections[role].format(text) for role, text in turns)
    return URIAL_PREFIX + body + "# Answer:\n```\n"


def test_the_default_renders_the_prefix_and_the_turns(client):
    messages = [{"role": "system", "content": "Answer in one line."},
                {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "In the sea."},
                {"role": "user", "content": "And lakes?"}]
    expected = completion(client, written(("system", "Answer in one line."), ("user", QUESTION),
                                          ("assistant", "In the sea."), ("user", "And lakes?")),
                          list(URIAL_STOP))
    assert chat(client, messages) == expected


def test_a_request_can_turn_it_off_or_bring_its_own_template(client, tokenizer):
    messages = [{"role": "user", "content": QUESTION}]
    own = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat(client, messages, in_context_alignment="none") == completion(client, own, None)
    template = "{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:"
    assert chat(client, messages, chat_template=template) == completion(
        client, f"Q: {QUESTION}\nA:", None)
    assert chat(client, messages, in_context_alignment="urial") == chat(client, messages)


def test_the_prefix_is_served_from_the_prefix_cache(client, urial_server, tokenizer):
    prefix_tokens = len(tokenizer(URIAL_PREFIX)["input_ids"])
    before = urial_server.ctx.engine.stats.cached_prompt_tokens
    for question in ("What is rain?", "Why is the sky blue?"):
        chat(client, [{"role": "user", "content": question}])
    assert urial_server.ctx.engine.stats.cached_prompt_tokens - before >= prefix_tokens - 2


def test_the_responses_api_takes_the_field(urial_server, client):
    body = {"model": "tiny-llama", "input": QUESTION, "max_output_tokens": 12,
            "temperature": 0, "ignore_eos": True}
    urial = urial_server.post("/v1/responses", body).json()
    plain = urial_server.post("/v1/responses", {**body, "in_context_alignment": "none"}).json()
    text = [item["content"][0]["text"] for item in (urial["output"][0], plain["output"][0])]
    assert text[0] == chat(client, [{"role": "user", "content": QUESTION}])
    assert text[1] == chat(client, [{"role": "user", "content": QUESTION}],
                           in_context_alignment="none")


@pytest.mark.parametrize("fields", [
    {"in_context_alignment": "lima"},
    {"in_context_alignment": 1},
    {"in_context_alignment": "urial", "chat_template": "{{ messages[0].content }}"},
])
def test_bad_values_are_400s_naming_the_field(urial_server, fields):
    reply = urial_server.post("/v1/chat/completions", {
        "model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], **fields})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "in_context_alignment"


def test_completions_refuse_it(urial_server):
    reply = urial_server.post("/v1/completions", {"model": "tiny-llama", "prompt": "hi",
                                                  "in_context_alignment": "urial"})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "in_context_alignment"
