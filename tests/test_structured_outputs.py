"""Structured outputs on a tiny random model: whatever the weights say, the output follows the
constraint (a random model writes valid JSON only if the mask holds), constrained rows leave
their batch neighbours' tokens alone, and bad constraints are a 400 naming the field."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import torch

from steerserve.adapters.steering.spec import (
    ApplyTo,
    SteerEdit,
    SteeringSpec,
    SteerMode,
    SteerTarget,
)
from steerserve.decoding.model.info import ModelInfo
from steerserve.decoding.sampling.grammar import GrammarMask, grammar_mask
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.decoding.sampling.sampler import RowState, sample
from steerserve.server.schemas.requests import ChatCompletionRequest
from steerserve.server.translate.structured import GrammarCache, body_constraint
from tests.engine_helpers import Collector, run_to_completion
from tests.support import make_engine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "role", "tags", "active"], "additionalProperties": False}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json={"model": "tiny", **body},
                      headers=server.headers(), timeout=120)


def chat_text(server, **fields) -> tuple[str, str]:
    reply = post(server, CHAT, {"messages": [{"role": "user", "content": "Describe a person."}],
                                "max_tokens": 200, **fields})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


def check_person(doc: dict) -> None:
    assert set(doc) == set(PERSON["properties"])
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 12
    assert isinstance(doc["age"], int) and 0 <= doc["age"] <= 120
    assert doc["role"] in ("admin", "user", "guest")
    assert len(doc["tags"]) <= 3 and all(len(t) <= 6 for t in doc["tags"])
    assert isinstance(doc["active"], bool)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_holds_on_random_weights(tiny_server, seed):
    text, finish = chat_text(tiny_server, temperature=1.0, seed=seed, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    check_person(json.loads(text))
    assert finish == "stop"


def test_json_object_is_an_object(tiny_server):
    text, _ = chat_text(tiny_server, temperature=0.7, seed=3, max_tokens=400,
                        response_format={"type": "json_object"})
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("fields, check", [
    ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
     lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
    ({"guided_regex": "(yes|no), [A-Z][a-z]{1,5}"},
     lambda t: re.fullmatch("(yes|no), [A-Z][a-z]{1,5}", t)),
    ({"structured_outputs": {"choice": ["red", "green", "blue ✓"]}},
     lambda t: t in ("red", "green", "blue ✓")),
    ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
    ({"structured_outputs": {"grammar": 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'}},
     lambda t: re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", t)),
    ({"guided_grammar": 'root ::= "x" [0-9] [0-9]?'}, lambda t: re.fullmatch("x[0-9]{1,2}", t)),
    ({"guided_json": json.dumps(PERSON)}, lambda t: check_person(json.loads(t)) is None),
])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_vllm_constraints_on_chat_and_completions(tiny_server, fields, check, path):
    base = ({"messages": [{"role": "user", "content": "Go."}]} if path == CHAT
            else {"prompt": "Answer:"})
    reply = post(tiny_server, path, {**base, "max_tokens": 300, "temperature": 1.0, "seed": 7,
                                     **fields})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    text = choice["message"]["content"] if path == CHAT else choice["text"]
    assert check(text), text
    assert choice["finish_reason"] == "stop"


def test_logprobs_and_stop_strings_compose(tiny_server):
    reply = post(tiny_server, CHAT, {"messages": [{"role": "user", "content": "Go."}],
                                     "max_tokens": 200, "temperature": 0.9, "seed": 3,
                                     "logprobs": True, "top_logprobs": 2,
                                     "guided_regex": "[a-z]{2,6}( [a-z]{2,6}){1,4}"})
    choice = reply.json()["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == choice["message"]["content"]
    assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in tokens)
    stopped = post(tiny_server, CHAT, {"messages": [{"role": "user", "content": "Go."}],
                                       "max_tokens": 50, "stop": ["b"],
                                       "guided_regex": "a{2,3}b[0-9]{5}"}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and re.fullmatch("a{2,3}",
                                                               stopped["message"]["content"])


def test_max_tokens_cut_is_length(tiny_server):
    text, finish = chat_text(tiny_server, max_tokens=5, temperature=0.0, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert finish == "length" and text.startswith("{")


def test_streamed_equals_whole(tiny_server):
    body = {"messages": [{"role": "user", "content": "Go."}], "max_tokens": 200, "seed": 11,
            "temperature": 0.8, "n": 2,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "p", "schema": PERSON}}}
    whole = post(tiny_server, CHAT, body).json()["choices"]
    texts = ["", ""]
    with httpx.stream("POST", f"{tiny_server.base_url}{CHAT}", headers=tiny_server.headers(),
                      json={"model": "tiny", **body, "stream": True}, timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == [c["message"]["content"] for c in sorted(whole, key=lambda c: c["index"])]
    for text in texts:
        check_person(json.loads(text))


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "no"}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"grammar": "start: (("}}, "structured_outputs.grammar"),
    ({"guided_grammar": "root ::= ("}, "guided_grammar"),
    ({"structured_outputs": {"regex": "[0-9"}}, "structured_outputs.regex"),
    ({"guided_regex": "a" * 70_000}, "guided_regex"),
    ({"guided_regex": "(" + "|".join(f"w{i}[a-z]{{1,9}}" for i in range(5000)) + "){1,80}"},
     "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"guided_choice": [""]}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": "[" * 30000 + "]" * 30000}, "guided_json"),  # nests past any parser
    ({"guided_regex": "a{20000}"}, "guided_regex"),  # would cost ~5 ms of mask every step
    ({"guided_json": {"type": "string", "pattern": "^(ab){5000}$"}}, "guided_json"),
    ({"structured_outputs": {"grammar": "start: /x{1,99999}/"}}, "structured_outputs.grammar"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice"),
]


@pytest.mark.parametrize("fields, param", BAD)
def test_bad_constraints_are_400_naming_the_field(tiny_server, fields, param):
    reply = post(tiny_server, CHAT, {"messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 4, **fields})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.json()


def _grammar(model, fields: dict):
    info = ModelInfo.of(model, model.model.config.vocab_size)
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}],
                                 **fields)
    return GrammarCache().compile(info, body_constraint(body))


def test_mixed_batch_gives_each_request_its_tokens_alone(llama):
    """Greedy: constrained, plain, steered and penalised requests in one batch each get
    exactly the tokens they get alone; the constrained one follows its regex."""
    grammar = _grammar(llama, {"guided_regex": "[a-z ]{3,40}"})
    steering = SteeringSpec((SteerEdit(0, SteerTarget.RESIDUAL, torch.ones(64), 2.0,
                                       SteerMode.ADD, False, ApplyTo.BOTH),))
    prompts = {"constrained": [1, 5, 9, 200], "plain": [1, 7, 300], "other": [1, 8, 8, 8, 42],
               "steered": [1, 7, 300]}
    params = {"constrained": SamplingParams(max_tokens=50, temperature=0.0, grammar=grammar),
              "plain": SamplingParams(max_tokens=12, temperature=0.0),
              "other": SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=1.0),
              "steered": SamplingParams(max_tokens=12, temperature=0.0)}
    steerings = {"steered": steering}
    engine = make_engine(llama)
    alone = {}
    for name in prompts:
        collector = Collector()
        collector.submit(engine, name, prompts[name], params[name],
                         steering=steerings.get(name))
        run_to_completion(engine)
        alone[name] = collector.tokens(name)
    together = Collector()
    for name in prompts:
        together.submit(engine, name, prompts[name], params[name],
                        steering=steerings.get(name))
    run_to_completion(engine)
    assert alone["steered"] != alone["plain"]
    assert {name: together.tokens(name) for name in prompts} == alone
    assert re.fullmatch("[a-z ]{3,40}", together.text("constrained"))
    assert alone["constrained"] != alone["plain"]


def _mask(blocked: torch.Tensor, constrained: list[bool]) -> GrammarMask:
    return GrammarMask(blocked, torch.tensor(constrained))


def test_grammar_mask_leaves_adaptive_temperature_to_the_model():
    """EDT reads the model's distribution before the grammar: the same temperature with and
    without a mask; the token drawn lies inside the mask, and so does a greedy row's."""
    from steerserve.decoding.sampling.adaptive import AdaptiveTemperature
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    blocked = torch.ones(2, 64, dtype=torch.bool)
    blocked[:, [3, 17, 40]] = False
    edt = SamplingParams(adaptive=AdaptiveTemperature("edt", t0=0.8, theta=0.5, n=0.8),
                         temperature=0.8)
    rows = [RowState(edt, generator=torch.Generator()),
            RowState(SamplingParams(temperature=0.0))]
    free = sample(logits.clone(), rows)
    masked = sample(logits.clone(), rows, _mask(blocked, [True, True]))
    assert torch.equal(free.temperatures, masked.temperatures)
    assert masked.tokens.tolist()[0] in (3, 17, 40) and masked.tokens.tolist()[1] in (3, 17, 40)


def test_a_row_with_nothing_left_draws_inside_its_grammar():
    logits = torch.full((2, 8), float("-inf"))
    logits[:, 0] = 1.0  # a method's plausibility cut kept only token 0, which the grammar bans
    blocked = torch.tensor([[True, True, False, True, False, True, True, True],
                            [False] * 8])
    _mask(blocked, [True, False]).apply_(logits)
    assert logits[0].isfinite().tolist() == (~blocked[0]).tolist()
    assert logits[1, 0] == 1.0 and logits[1, 1:].isneginf().all()


def test_the_unpacked_mask_is_llguidance_own(llama):
    """Bit order: the tokens allowed are exactly those llguidance's own torch helper keeps."""
    import llguidance.torch
    grammar = _grammar(llama, {"guided_regex": "(ab|x[0-9]+|hello)"})
    state = grammar.start()
    width = llama.model.config.vocab_size + 40  # a wider batch: the tail is forbidden
    mask = grammar_mask([None, state], width, torch.device("cpu"))
    bitmask = llguidance.torch.allocate_token_bitmask(1, grammar.vocab_size)
    llguidance.torch.fill_next_token_bitmask(state.matcher, bitmask)
    reference = torch.zeros(1, grammar.vocab_size)
    llguidance.torch.apply_token_bitmask_inplace(reference, bitmask)
    expected = torch.ones(width, dtype=torch.bool)
    expected[:grammar.vocab_size] = reference[0].isneginf()
    assert torch.equal(mask.blocked[1], expected) and not mask.blocked[0].any()
    assert mask.constrained.tolist() == [False, True] and (~mask.blocked[1]).sum() >= 3
