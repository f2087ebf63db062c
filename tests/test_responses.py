"""The Responses API (`POST /v1/responses`) through the official client's
`client.responses.create`: the same tokens as chat, typed stream events, the length limit as
`incomplete`, steering and decoding extensions, the stateless refusals, and a failure in the
engine (a plug-in method that raises inside the step) as a 500 or a failed stream."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import httpx
import openai
import pytest

from steerserve.decoding.methods.base import DecodingMethod, LanePlanner, Mix, lane, param
from steerserve.decoding.methods.registry import BUILTIN, MethodRegistry
from steerserve.decoding.request import LaneSpec
from steerserve.server.app import build_context
from steerserve.server.schemas.requests import MAX_MESSAGES
from steerserve.server.settings import ServerSettings
from tests.inprocess import InProcessServer
from tests.support import API_KEY

PROMPT = "Once upon a time there was a small town"
EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
          "response.content_part.added"]
CLOSING = ["response.output_text.done", "response.content_part.done",
           "response.output_item.done"]
STRONG = [{"values": [4.0] * 64, "layers": [0, 1], "scale": 8.0}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key=API_KEY, max_retries=0)


def greedy(client, tokens: int = 12, **fields):
    extra = {"ignore_eos": True, **fields.pop("extra_body", {})}
    return client.responses.create(model="tiny", input=fields.pop("input", PROMPT),
                                   max_output_tokens=tokens, temperature=0, extra_body=extra,
                                   **fields)


def test_text_input_equals_chat_and_counts_usage(client):
    out = greedy(client, 12)
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
        temperature=0, extra_body={"ignore_eos": True})
    assert out.object == "response" and out.id.startswith("resp_") and out.model == "tiny"
    assert out.output_text and out.output_text == chat.choices[0].message.content
    message = out.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    assert out.usage.output_tokens == chat.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    assert out.temperature == 0 and out.max_output_tokens == 12 and out.store is False


def test_length_limit_is_incomplete_and_a_stop_is_completed(client):
    out = greedy(client, 6)
    assert out.status == "incomplete" and out.output[0].status == "incomplete"
    assert out.incomplete_details.reason == "max_output_tokens"
    stop = out.output_text[2:4]  # the same greedy text, cut short by a stop string
    assert stop.strip()
    stopped = greedy(client, 6, extra_body={"stop": stop})
    assert stopped.status == "completed" and stopped.incomplete_details is None
    assert stopped.output_text == out.output_text[:out.output_text.index(stop)]


def test_messages_and_instructions_are_the_chat_messages(client):
    messages = [{"role": "user", "content": "Hello world!"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
                {"role": "user", "content": [{"type": "input_text", "text": "How are "},
                                             {"type": "input_text", "text": "you?"}]}]
    out = greedy(client, 8, input=messages, instructions="Be brief.")
    chat = client.chat.completions.create(
        model="tiny", max_tokens=8, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": "Be brief."}, messages[0],
                  {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": "How are you?"}])
    assert out.output_text == chat.choices[0].message.content
    assert out.usage.input_tokens == chat.usage.prompt_tokens
    assert out.instructions == "Be brief."
    developer = greedy(client, 8, input=[{"role": "developer", "content": "Be brief."},
                                         messages[0]])
    assert developer.output_text


def test_stream_events_in_order_join_to_the_whole_text(client):
    whole = greedy(client, 10)
    events = list(greedy(client, 10, stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == EVENTS and kinds[-4:] == [*CLOSING, "response.incomplete"]
    assert kinds[4:-4] == ["response.output_text.delta"] * len(deltas) and deltas
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in deltas)
    assert text == whole.output_text and events[-4].text == text
    assert events[-2].item.content[0].text == text and events[-2].item.status == "incomplete"
    assert {e.item_id for e in deltas} == {events[2].item.id}
    assert len({e.response.id for e in (events[0], events[1], events[-1])}) == 1
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == 10
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.total_tokens == final.usage.input_tokens + 10


def test_a_stream_that_stops_ends_with_completed_and_usage(client):
    text = greedy(client, 8).output_text
    stop = text[3:5]
    events = list(greedy(client, 8, stream=True, extra_body={"stop": stop}))
    assert events[-1].type == "response.completed"
    final = events[-1].response
    assert final.status == "completed" and final.output_text == text[:text.index(stop)]
    assert final.usage.output_tokens > 0
    assert final.usage.total_tokens == final.usage.input_tokens + final.usage.output_tokens


def test_steering_through_extra_body_changes_the_output(client):
    plain = greedy(client, 12).output_text
    steered = greedy(client, 12, extra_body={"steering": STRONG})
    assert steered.output_text != plain
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12,
        temperature=0, extra_body={"ignore_eos": True, "steering": STRONG})
    assert steered.output_text == chat.choices[0].message.content


def test_a_decoding_method_through_extra_body(client):
    dola = {"method": "dola", "layers": [0]}
    out = greedy(client, 8, extra_body={"decoding": dola, "seed": 3})
    assert out.output_text and out.model_extra["decoding"] == dola
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
        temperature=0, extra_body={"ignore_eos": True, "decoding": dola})
    assert out.output_text == chat.choices[0].message.content


def bad(client, **fields) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**{"model": "tiny", "input": PROMPT, **fields})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(("fields", "param"), [
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"text": {"format": {"type": "json_object"}, "verbosity": "low"}}, "text"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"extra_body": {"n": 2}}, "n"),  # not a Responses field
    ({"extra_body": {"stream_options": {"include_obfuscation": False}}}, "stream_options"),
])
def test_unsupported_fields_are_refused_by_name(client, fields, param):
    error = bad(client, **fields)
    assert error["param"] == param and param in error["message"], error


@pytest.mark.parametrize(("fields", "param"), [
    ({"extra_body": {"steering": [{"values": [1.0] * 63, "layers": [0]}]}},
     "steering.0.values"),
    ({"extra_body": {"decoding": {"method": "dola", "layers": [2]}}}, "decoding.layers"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"extra_body": {"lora": [{"name": "x"}]}}, "lora"),  # passed on: this model has no LoRA
    ({"temperature": 3}, "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 5000}, "max_output_tokens"),  # past the context
])
def test_invalid_values_name_the_field(client, fields, param):
    assert bad(client, **fields)["param"] == param


def test_bad_input_names_the_input_field(client):
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
    assert bad(client, input=image)["param"] == "input.0.content.0.type"
    assert bad(client, input=[])["param"] == "input"
    assert bad(client, input=[{"type": "function_call_output", "call_id": "c",
                               "output": "x"}])["param"].startswith("input.0")
    assert bad(client, input="a " * 3000)["param"] == "input"  # past the context


def test_harmless_openai_fields_are_accepted(client):
    out = greedy(client, 4, store=False, tools=[], tool_choice="none", truncation="disabled",
                 text={"format": {"type": "text"}}, parallel_tool_calls=False, user="u",
                 metadata={"k": "v"}, prompt_cache_key="p")
    assert out.output_text and out.metadata == {"k": "v"} and out.tool_choice == "none"


def test_api_key_and_json_are_required(tiny_server):
    url = f"{tiny_server.base_url}/v1/responses"
    body = {"model": "tiny", "input": "Hi"}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    assert httpx.post(url, content=json.dumps(body), timeout=30, headers={
        **tiny_server.headers(), "Content-Type": "text/plain"}).status_code == 415


# ---- a failure in the engine -----------------------------------------------------------------


@dataclass(frozen=True)
class FaultyParams:
    explode: bool = param(True, doc="raise inside the batched step")


@dataclass(frozen=True, eq=False)
class Faulty(DecodingMethod):
    name: ClassVar[str] = "faulty_responses"
    Params: ClassVar[type] = FaultyParams
    lanes: tuple[LaneSpec, ...]

    @classmethod
    def build(cls, params: FaultyParams, planner: LanePlanner) -> Faulty:
        return cls((planner.base,))

    def mix(self) -> Mix:
        return Mix((lane(0),), log_softmax=True)

    @classmethod
    def step_rows(cls, members, early_exits):
        raise RuntimeError("injected fault")


@pytest.fixture(scope="module")
def faulty_server(llama):
    ctx = build_context(ServerSettings(vectors_dir=None, max_num_seqs=4), llama,
                        methods=MethodRegistry((*BUILTIN, Faulty)))
    live = InProcessServer(ctx)
    yield live
    live.stop()


def test_a_failure_is_a_500_or_a_failed_stream(faulty_server):
    body = {"model": "tiny-llama", "input": PROMPT, "max_output_tokens": 8,
            "decoding": {"method": "faulty_responses"}}
    failed = faulty_server.post("/v1/responses", body)
    assert failed.status_code == 500 and "injected fault" in failed.json()["error"]["message"]
    client = openai.OpenAI(base_url=f"{faulty_server.base_url}/v1", api_key="x", max_retries=0)
    events = list(client.responses.create(model="tiny-llama", input=PROMPT, stream=True,
                                          max_output_tokens=8,
                                          extra_body={"decoding": body["decoding"]}))
    assert [e.type for e in events] == [*EVENTS, "error", "response.failed"]
    assert "injected fault" in events[-2].message and events[-1].response.status == "failed"
    assert "injected fault" in events[-1].response.error.message
    assert faulty_server.post("/v1/responses", {**body, "decoding": None}).status_code == 200


# ---- structured output and function tools --------------------------------------------------------
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "label": {"enum": ["a", "b"]}},
         "required": ["x", "label"], "additionalProperties": False}
MOVE = {"type": "function", "name": "move", "description": "Move to a point",
        "parameters": POINT}


def test_text_format_json_schema_constrains_the_output(client):
    out = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=200,
                                  temperature=1.0, extra_body={"seed": 4}, text={"format": {
                                      "type": "json_schema", "name": "point", "schema": POINT,
                                      "strict": True}})
    point = json.loads(out.output_text)
    assert set(point) == {"x", "label"} and 0 <= point["x"] <= 9 and point["label"] in "ab"
    assert out.text.format.type == "json_schema"


def test_required_function_tools_become_function_call_items(client):
    out = client.responses.create(model="tiny", input=PROMPT, max_output_tokens=200,
                                  temperature=1.0, extra_body={"seed": 2}, tools=[MOVE],
                                  tool_choice="required", parallel_tool_calls=False)
    [call] = out.output
    assert call.type == "function_call" and call.name == "move" and call.status == "completed"
    assert call.call_id.startswith("call_") and set(json.loads(call.arguments)) == {"x", "label"}
    assert out.tools[0].name == "move" and out.tool_choice == "required"


def test_streamed_function_calls_equal_the_whole_response(client):
    fields = {"model": "tiny", "input": PROMPT, "max_output_tokens": 200, "temperature": 1.0,
              "extra_body": {"seed": 5}, "tools": [MOVE], "tool_choice": "required"}
    whole = client.responses.create(**fields)
    assert whole.status == "completed"  # a seed whose calls all end inside the budget
    events = list(client.responses.create(**fields, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    arguments = [e.arguments for e in events
                 if e.type == "response.function_call_arguments.done"]
    assert [(i.name, i.arguments) for i in done] == [(i.name, i.arguments)
                                                     for i in whole.output]
    assert arguments == [i.arguments for i in whole.output]
    assert [i.arguments for i in events[-1].response.output] == arguments


def test_function_call_outputs_return_to_the_model(client):
    call = {"type": "function_call", "call_id": "call_9", "name": "move",
            "arguments": '{"x": 3, "label": "a"}'}
    result = {"type": "function_call_output", "call_id": "call_9", "output": "moved to 3"}
    plain = greedy(client, 4, tools=[MOVE])
    out = greedy(client, 4, tools=[MOVE], input=[{"role": "user", "content": PROMPT}, call,
                                                 result])
    assert out.usage.input_tokens > plain.usage.input_tokens + 15


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"tools": [{**MOVE, "name": "no spaces allowed"}]}, "tools.0.name"),
    ({"tools": [MOVE], "tool_choice": {"type": "function", "name": "jump"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "strin"}}}},
     "text.format.schema"),
])
def test_bad_tools_and_formats_name_the_field(client, fields, param):
    assert bad(client, **fields)["param"] == param


def test_too_many_items_with_the_instructions_names_input(client):
    many = [{"role": "user", "content": "x"}] * MAX_MESSAGES
    error = bad(client, input=many, instructions="Be brief.")
    assert error["param"] == "input" and "messages" not in error["message"]
    assert bad(client, input=many + [{"role": "user", "content": "y"}])["param"] == "input"


def test_max_tool_calls_caps_the_function_calls(client):
    fields = {"model": "tiny", "input": PROMPT, "max_output_tokens": 300, "temperature": 1.0,
              "tools": [MOVE], "tool_choice": "required"}
    def calls(**more) -> int:
        return len([i for i in client.responses.create(**fields, **more).output
                    if i.type == "function_call"])

    uncapped = [calls(extra_body={"seed": seed}) for seed in range(3)]
    assert max(uncapped) > 1  # random weights call again and again
    assert [calls(max_tool_calls=1, extra_body={"seed": seed}) for seed in range(3)] == [
        min(n, 1) for n in uncapped]
