"""Tool calling on a tiny random model: forced calls always follow the tool's schema, streamed
deltas assemble to the whole answer, the readers find calls wherever the text is split, the
conversation reaches the template natively or written out, and bad tools are a 400."""

from __future__ import annotations

import json

import httpx
import pytest

from steerserve.server.schemas.requests import ChatCompletionRequest
from steerserve.server.tools.formats import FORMATS, Hermes, Llama3Json, ParsedCall, format_for
from steerserve.server.tools.prompt import conversation

CHAT = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def post(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{CHAT}", headers=server.headers(), timeout=120,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 200, **body})


def check_arguments(call: dict) -> None:
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        assert set(arguments) == {"city", "unit"} and len(arguments["city"]) <= 12
        assert arguments["unit"] in ("celsius", "fahrenheit")
    else:
        assert call["function"]["name"] == "add" and set(arguments) == {"a", "b"}
        assert all(isinstance(v, int) and -99 <= v <= 99 for v in arguments.values())


@pytest.mark.parametrize("seed", range(4))
def test_required_gives_a_call_that_follows_its_schema(tiny_server, seed):
    reply = post(tiny_server, {"tools": [WEATHER, ADD], "tool_choice": "required",
                               "parallel_tool_calls": False, "temperature": 1.0, "seed": seed})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    check_arguments(call)


def test_parallel_calls_each_follow_their_schema(tiny_server):
    """Random weights need not stop calling: a cut answer keeps its complete calls."""
    for seed in range(3):
        reply = post(tiny_server, {"tools": [WEATHER, ADD], "tool_choice": "required",
                                   "temperature": 1.0, "seed": seed})
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] in ("tool_calls", "length")
        assert choice["message"]["tool_calls"]
        for call in choice["message"]["tool_calls"]:
            check_arguments(call)


def test_a_named_function_is_the_one_called_once(tiny_server):
    for seed in range(3):
        reply = post(tiny_server, {"tools": [WEATHER, ADD], "temperature": 1.0, "seed": seed,
                                   "tool_choice": {"type": "function",
                                                   "function": {"name": "add"}}})
        calls = reply.json()["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["add"]
        check_arguments(calls[0])


def test_streamed_tool_calls_assemble_to_the_whole_answer(tiny_server):
    body = {"tools": [WEATHER, ADD], "tool_choice": "required", "temperature": 1.0,
            "seed": 5, "n": 2, "max_tokens": 600}
    whole = sorted(post(tiny_server, body).json()["choices"], key=lambda c: c["index"])
    calls: list[dict] = [{}, {}]
    reasons = [None, None]
    with httpx.stream("POST", f"{tiny_server.base_url}{CHAT}", headers=tiny_server.headers(),
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 200, **body,
                            "stream": True}, timeout=120) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                for delta in choice["delta"].get("tool_calls") or []:
                    calls[choice["index"]][delta["index"]] = delta["function"]
                reasons[choice["index"]] = choice["finish_reason"] or reasons[choice["index"]]
    for index, choice in enumerate(whole):
        expected = [c["function"] for c in choice["message"]["tool_calls"]]
        assert [calls[index][i] for i in sorted(calls[index])] == expected
    assert reasons == [choice["finish_reason"] for choice in whole]


def test_tool_results_go_back_into_the_conversation(tiny_server):
    messages = [*MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function", "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    with_result = post(tiny_server, {"messages": messages, "tools": [WEATHER],
                                     "temperature": 0.0, "max_tokens": 5})
    assert with_result.status_code == 200, with_result.text
    before = post(tiny_server, {"tools": [WEATHER], "temperature": 0.0, "max_tokens": 5})
    grown = (with_result.json()["usage"]["prompt_tokens"]
             - before.json()["usage"]["prompt_tokens"])
    assert grown > 20  # the call and its result are in the prompt


BAD = [
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strin"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "^a{9999}$"}}}}}],
      "tool_choice": "required"}, "tools"),
]


@pytest.mark.parametrize("fields, param", BAD)
def test_bad_tools_are_400_naming_the_field(tiny_server, fields, param):
    reply = post(tiny_server, {**fields, "max_tokens": 4})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.json()


TEXTS = {
    "hermes": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
               '"Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "add", '
               '"arguments": {"a": 1, "b": 2}}\n</tool_call>\n'),
    "llama3_json": ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
                    '"celsius"}}; {"name": "add", "parameters": {"a": 1, "b": 2}}'),
}
EXPECTED = [ParsedCall("get_weather", '{"city": "Paris", "unit": "celsius"}'),
            ParsedCall("add", '{"a": 1, "b": 2}')]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_readers_find_the_same_calls_wherever_the_text_is_split(name):
    text = TEXTS[name]
    whole = FORMATS[name].reader().read_all(text)
    assert whole.calls == EXPECTED
    assert whole.content == ("Let me check." if name == "hermes" else "")
    for cut in range(1, len(text)):
        for second_cut in (cut + 1, cut + 7):
            reader = FORMATS[name].reader()
            pieces = [text[:cut], text[cut:second_cut], text[second_cut:]]
            read = reader.feed(pieces[0]).merge(reader.feed(pieces[1]))
            read = read.merge(reader.feed(pieces[2])).merge(reader.finish())
            assert (read.content, read.calls) == (whole.content, whole.calls), (cut, pieces)


@pytest.mark.parametrize("text, content", [
    ("Plain answer, no calls.", "Plain answer, no calls."),
    ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>"),
    ("cut short <tool_call>\n{\"name\": \"add\", \"argu", 'cut short <tool_call>\n{"name": '
     '"add", "argu'),
])
def test_text_that_is_not_a_call_stays_content(text, content):
    read = Hermes().reader().read_all(text)
    assert (read.content, read.calls) == (content, [])
    assert Llama3Json().reader().read_all("{not a call} text").calls == []


def test_the_format_follows_the_template_unless_set():
    assert format_for("auto", "{{ '<|python_tag|>' }}").name == "llama3_json"
    assert format_for("auto", "{{ messages }}").name == "hermes"
    assert format_for("llama3_json", "{{ messages }}").name == "llama3_json"


QWEN_LIKE = ("{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} "
             "{{ t.function.name }}{% endfor %}<|im_end|>\n{%- endif %}"
             "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
             "{%- for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
             "{{ c.function.arguments.city }}{% endfor %}<|im_end|>\n{%- endfor %}")
ROUND_TRIP = [*MESSAGES,
              {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                  "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
              {"role": "tool", "tool_call_id": "c1", "content": "-3 and snow"}]


def test_a_template_that_renders_tools_gets_them_natively(tokenizer):
    body = ChatCompletionRequest(model="m", messages=ROUND_TRIP, tools=[WEATHER, ADD])
    messages, tools = conversation(body, QWEN_LIKE, Hermes())
    text = tokenizer.apply_chat_template(messages, tools=tools, chat_template=QWEN_LIKE,
                                         tokenize=False)
    assert "TOOLS: get_weather add" in text
    assert "CALL get_weather Oslo" in text  # arguments reach the template as a mapping
    assert "<|im_start|>tool\n-3 and snow" in text


def test_a_template_without_tools_gets_the_written_out_default(tokenizer):
    body = ChatCompletionRequest(model="m", messages=ROUND_TRIP, tools=[WEATHER])
    messages, tools = conversation(body, tokenizer.chat_template, Hermes())
    assert tools is None and messages[0]["role"] == "system"
    assert '"name": "get_weather"' in messages[0]["content"] and "<tools>" in messages[0][
        "content"]
    assert messages[2]["content"] == Hermes().call_text(
        [ParsedCall("get_weather", '{"city": "Oslo", "unit": "celsius"}')])
    assert messages[3] == {"role": "user",
                           "content": "<tool_response>\n-3 and snow\n</tool_response>"}
    none = ChatCompletionRequest(model="m", messages=MESSAGES, tools=[WEATHER],
                                 tool_choice="none")
    assert conversation(none, tokenizer.chat_template, Hermes())[0] == [
        {"role": "user", "content": MESSAGES[0]["content"]}]


@pytest.mark.parametrize("limit", [0, 1, 2])
def test_a_limited_reader_keeps_the_first_calls_and_all_the_content(limit):
    for name, text in TEXTS.items():
        whole = FORMATS[name].reader().read_all(text)
        limited = FORMATS[name].open_reader(limit)
        cut = len(text) // 2
        read = limited.feed(text[:cut]).merge(limited.feed(text[cut:])).merge(limited.finish())
        assert read.calls == whole.calls[:limit] and read.content == whole.content
