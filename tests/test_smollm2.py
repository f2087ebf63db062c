"""The embedded SmolLM2-135M-Instruct: engine vs HF generate, and a live streamed chat."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from steerserve.decoding.sampling.params import SamplingParams
from tests.engine_helpers import Collector, hf_greedy, run_to_completion
from tests.support import LiveServer, load_script, make_engine

pytestmark = pytest.mark.slow


def test_batched_greedy_equals_hf_generate(smollm2, smollm2_reference):
    tokenizer = smollm2.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                      add_generation_prompt=True, return_dict=False)
        for q in ("What is the capital of France?", "Write a haiku about the sea.",
                  "List three prime numbers.")
    ]
    engine = make_engine(smollm2)
    collector = Collector()
    for i, prompt in enumerate(prompts):
        collector.submit(engine, str(i), list(prompt),
                         SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert collector.tokens(str(i)) == hf_greedy(smollm2_reference, list(prompt), 24)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
UPPERCASE = EXAMPLES / "adapters" / "uppercase"
FORMS = EXAMPLES / "routers" / "smollm2-forms"
QUESTIONS = ["Name three rivers in Europe.", "How do plants make food?",
             "Give me a tip for a job interview.", "What is a good name for a cat?"]


@pytest.fixture(scope="module")
def server():
    # The README's default (the embedded model) plus the example adapter, in float32: these
    # tests compare greedy outputs across batch shapes, which bf16 rounding perturbs (a CPU
    # with native bf16 makes --dtype auto pick it), and their thresholds were set in float32.
    live = LiveServer(["--lora", f"uppercase={UPPERCASE}", "--dtype", "float32",
                       "--allow-runtime-vectors", "--steering-vector",
                       f"context_knob={EXAMPLES / 'steering' / 'context_knob.safetensors'}",
                       "--deferral-head",
                       f"upper={EXAMPLES / 'heads' / 'smollm2-uppercase-deferral.safetensors'}",
                       *[arg for i in range(3)
                         for arg in ("--lora", f"expert-{i}={FORMS / f'expert-{i}'}")],
                       "--router", f"forms={FORMS}"])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")


def ask(client, model: str, question: str) -> str:
    reply = client.chat.completions.create(
        model=model, max_tokens=40, temperature=0,
        messages=[{"role": "user", "content": question}])
    return reply.choices[0].message.content


def upper_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def test_streamed_chat_on_the_default_server(client):
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", stream=True, max_tokens=30, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert "Paris" in text


def test_uppercase_adapter_changes_behaviour_and_unselecting_restores_it(client):
    before = [ask(client, "SmolLM2-135M-Instruct", q) for q in QUESTIONS]
    adapted = [ask(client, "uppercase", q) for q in QUESTIONS]
    after = [ask(client, "SmolLM2-135M-Instruct", q) for q in QUESTIONS]
    assert sum(map(upper_ratio, adapted)) / len(QUESTIONS) > 0.8
    assert sum(map(upper_ratio, before)) / len(QUESTIONS) < 0.3
    assert after == before


MOOD = json.loads((Path(__file__).resolve().parent.parent / "examples" / "steering"
                   / "joyful_gloomy.json").read_text())
MOOD_QUESTIONS = ["Tell me about your day.", "Describe the weather today.",
                  "What do you think about Mondays?", "Write a sentence about your home town.",
                  "How do you feel about the future?", "Describe a walk in the park."]


def joy_score(text: str) -> float:
    """Joyful minus gloomy words, per 100 words."""
    words = re.findall(r"[a-z]+", text.lower())
    joyful = sum(w in MOOD["joyful_words"] for w in words)
    gloomy = sum(w in MOOD["gloomy_words"] for w in words)
    return 100 * (joyful - gloomy) / max(len(words), 1)


def mean_joy(client, steering: list | None) -> float:
    extra = {"steering": steering} if steering else {}
    replies = [client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=40, temperature=0, extra_body=extra,
        messages=[{"role": "user", "content": q}]).choices[0].message.content
        for q in MOOD_QUESTIONS]
    return sum(joy_score(r) for r in replies) / len(replies)


def test_extracted_mood_vector_steers_both_ways(server, client):
    pairs = MOOD["pairs"]
    extracted = httpx.post(f"{server.base_url}/v1/steering/vectors", timeout=300, json={
        "name": "joyful", "model": "SmolLM2-135M-Instruct", "method": "mean_diff",
        "layers": {"start": 10, "end": 15}, "positive": [p["positive"] for p in pairs],
        "negative": [p["negative"] for p in pairs]})
    assert extracted.status_code == 200, extracted.text
    plain = mean_joy(client, None)
    joyful = mean_joy(client, [{"vector": "joyful", "scale": 0.4}])
    gloomy = mean_joy(client, [{"vector": "joyful", "scale": -0.4}])
    assert gloomy < plain < joyful, (gloomy, plain, joyful)
    assert joyful - gloomy > 3.0


def proxy_choices(client, alpha: float | None) -> list:
    extra = {} if alpha is None else {"decoding": {
        "method": "proxy_tuning", "expert": "uppercase", "anti_expert": "SmolLM2-135M-Instruct",
        "alpha": alpha}}
    return [client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=40, temperature=0, logprobs=True,
        top_logprobs=2, messages=[{"role": "user", "content": q}], extra_body=extra
    ).choices[0] for q in QUESTIONS]


def proxy_answers(client, alpha: float) -> list[str]:
    return [choice.message.content for choice in proxy_choices(client, alpha)]


def assert_same_greedy_path(got, expected) -> None:
    """Equal token by token, with equal logprobs; a batch of 2 lanes and a batch of 1 differ
    in the last float bits (GEMM blocking), so the paths may part only at a near tie."""
    for mine, theirs in zip(got.logprobs.content, expected.logprobs.content, strict=False):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-3)
        if mine.token != theirs.token:
            first, second = theirs.top_logprobs[:2]
            assert first.logprob - second.logprob < 1e-3, (mine.token, theirs.token)
            return
    assert got.message.content == expected.message.content


def test_proxy_tuning_with_the_uppercase_adapter_as_expert(client):
    plain_choices = proxy_choices(client, None)
    plain = [choice.message.content for choice in plain_choices]
    for got, expected in zip(proxy_choices(client, 0.0), plain_choices, strict=True):
        assert_same_greedy_path(got, expected)  # alpha 0 is plain decoding
    ratios = [sum(map(upper_ratio, proxy_answers(client, alpha))) / len(QUESTIONS)
              for alpha in (0.25, 0.5, 1.0)]
    base = sum(map(upper_ratio, plain)) / len(QUESTIONS)
    assert base < ratios[0] < ratios[1] < ratios[2], (base, ratios)
    assert ratios[2] > 0.8  # alpha 1 with base = anti-expert is the expert itself


# ---- structured outputs through the official client -------------------------------------------
# Strings are bounded, as for any small model: greedy SmolLM2 repeats itself inside an unbounded
# string until max_tokens (the constraint holds; the document never closes).
class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: float
    is_capital: bool


class Recipe(BaseModel):
    dish: str = Field(max_length=40)
    ingredients: list[Annotated[str, Field(max_length=30)]] = Field(max_length=6)
    minutes: int
    vegetarian: bool


class Review(BaseModel):
    product: str = Field(max_length=40)
    stars: int
    sentiment: Literal["positive", "neutral", "negative"]
    summary: str = Field(max_length=120)


TOPICS = ["Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Nairobi", "Toronto", "Sydney", "Madrid",
          "Hanoi", "Berlin", "Quito", "Dublin", "Seoul", "Accra", "Rome", "Delhi"]
STRUCTURED = ([(City, f"Give facts about {t} as JSON.") for t in TOPICS]
              + [(Recipe, f"Write a recipe for {d} as JSON.") for d in (
                  "pancakes", "tomato soup", "fried rice", "guacamole", "lentil curry",
                  "omelette", "banana bread", "pesto pasta", "ramen", "falafel", "chili",
                  "porridge", "paella", "tacos", "risotto", "hummus", "pizza")]
              + [(Review, f"Review {p} as JSON.") for p in (
                  "a cheap umbrella", "noise-cancelling headphones", "a slow laptop",
                  "a cosy hotel", "a late train", "a new phone", "a sticky keyboard",
                  "a great novel", "a loud blender", "running shoes", "a smart watch",
                  "a broken kettle", "a fast bike", "a rainy holiday", "a desk lamp",
                  "a garden hose")])


def parse_all(client, extra: dict, model: str = "SmolLM2-135M-Instruct", count: int = 50):
    def one(case):
        schema, prompt = case
        return client.chat.completions.parse(
            model=model, max_tokens=300, temperature=0, response_format=schema,
            messages=[{"role": "user", "content": prompt}], extra_body=extra)
    with ThreadPoolExecutor(16) as pool:  # one batch, as agents send them
        return list(pool.map(one, STRUCTURED[:count]))


def test_parse_returns_a_validated_object_for_every_prompt(client):
    assert len(STRUCTURED) >= 50
    for (schema, _), reply in zip(STRUCTURED, parse_all(client, {}), strict=True):
        assert isinstance(reply.choices[0].message.parsed, schema)
        assert reply.choices[0].finish_reason == "stop"


def test_parse_holds_when_steered_on_an_adapter_and_with_a_method(client):
    """A steered persona on the uppercase adapter, then proxy-tuning: still valid JSON."""
    steered = {"steering": [{"values": [0.05] * 576, "layers": {"start": 8, "end": 12}}]}
    for reply in parse_all(client, steered, model="uppercase", count=12):
        assert reply.choices[0].message.parsed is not None
    proxy = {"decoding": {"method": "proxy_tuning", "expert": "uppercase",
                          "anti_expert": "SmolLM2-135M-Instruct", "alpha": 0.5}}
    for reply in parse_all(client, proxy, count=12):
        assert reply.choices[0].message.parsed is not None


def test_structured_stream_equals_the_whole_answer(client):
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 200, "temperature": 0,
            "messages": [{"role": "user", "content": "Describe Lisbon as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "city", "strict": True,
                "schema": {**City.model_json_schema(), "additionalProperties": False}}}}
    whole = client.chat.completions.create(**body).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or ""
                       for chunk in client.chat.completions.create(**body, stream=True)
                       if chunk.choices)
    assert streamed == whole
    City.model_validate_json(whole)


# ---- tool calling through the official client ---------------------------------------------------
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string",
                                                                 "maxLength": 30}},
                   "required": ["timezone"], "additionalProperties": False}}}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Toronto"]


def weather_question(city: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the weather like in {city} right now?"}]


def assert_valid_call(call, tools=(WEATHER_TOOL, TIME_TOOL)) -> None:
    """The arguments parse and follow the called tool's schema, checked by pydantic."""
    [tool] = [t for t in tools if t["function"]["name"] == call.function.name]
    schema = tool["function"]["parameters"]
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == set(schema["required"])
    for key, value in arguments.items():
        rule = schema["properties"][key]
        assert isinstance(value, str) and len(value) <= rule.get("maxLength", 10**6)
        assert value in rule.get("enum", [value])


def test_required_and_named_tools_always_give_valid_calls(client):
    for city in CITIES:
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            reply = client.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=weather_question(city), max_tokens=120,
                temperature=0, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice)
            message = reply.choices[0].message
            assert message.tool_calls and reply.choices[0].finish_reason == "tool_calls"
            for call in message.tool_calls:
                assert_valid_call(call)
            if isinstance(choice, dict):
                assert [c.function.name for c in message.tool_calls] == ["get_weather"]


def test_a_tool_round_trip_and_its_stream(client):
    first = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=weather_question("Oslo"), max_tokens=120,
        temperature=0, tools=[WEATHER_TOOL], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    streamed: dict[int, dict] = {}
    for chunk in client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=weather_question("Oslo"), max_tokens=120,
            temperature=0, tools=[WEATHER_TOOL], tool_choice="required", stream=True):
        for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
            streamed[delta.index] = {"name": delta.function.name,
                                     "arguments": delta.function.arguments}
    assert list(streamed.values()) == [{"name": c.function.name, "arguments":
                                        c.function.arguments}
                                       for c in first.choices[0].message.tool_calls]
    answer = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=60, temperature=0, tools=[WEATHER_TOOL],
        messages=[*weather_question("Oslo"), first.choices[0].message.model_dump(
            exclude_none=True), {"role": "tool", "tool_call_id": call.id,
                                 "content": json.dumps({"temperature": -3, "sky": "snow"})}])
    text = answer.choices[0].message.content or ""
    assert answer.choices[0].finish_reason in ("stop", "tool_calls")
    assert "snow" in text.lower() or "-3" in text or answer.choices[0].message.tool_calls


def test_urial_answers_end_at_the_closing_fence(client):
    """The in-context alignment prefix on real weights: the answers are right, and they end by
    themselves at URIAL's stop strings (no fence or next query left in the text)."""
    cities = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo",
              "Spain": "Madrid", "Germany": "Berlin"}
    ended = 0
    for country, city in cities.items():
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=96, temperature=0,
            messages=[{"role": "user", "content": f"What is the capital of {country}?"}],
            extra_body={"in_context_alignment": "urial", "repetition_penalty": 1.2})
        text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert city in text and "```" not in text and "# Query" not in text
        assert reply.usage.prompt_tokens > 450  # the prefix is in the prompt
        ended += reason == "stop"
    assert ended >= 4  # 135M parameters: some answers still ramble to the token limit


def test_the_shipped_context_knob_turns_answers_between_context_and_prior(client):
    """examples/steering/context_knob.safetensors, clamped on the held-out counterfactual
    questions (asked with no instruction): the context side makes answers name the context's
    country far more often than the prior side does, and the prior side the true country."""
    data = load_script("examples/context_knob_data.py")
    knob = json.loads((EXAMPLES / "steering" / "context_knob.json").read_text())
    prior, context = (knob["coordinates"][k] for k in ("prior_mean", "context_mean"))
    items = data.split(knob["settings"]["seed"])["held_out"]

    def sides(coordinate: float) -> list[str]:
        def one(item) -> str:
            reply = client.chat.completions.create(
                model="SmolLM2-135M-Instruct", max_tokens=24, temperature=0,
                messages=[{"role": "user", "content": item.question("none")}],
                extra_body={"steering": [{"vector": "context_knob", "mode": "clamp",
                                          "scale": coordinate, "apply_to": "generation"}]})
            return item.follows(reply.choices[0].message.content)
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, items))

    towards_prior = sides(prior - 2 * (context - prior))
    towards_context = sides(context + (context - prior))
    assert towards_context.count("context") - towards_prior.count("context") >= len(items) // 3
    assert towards_prior.count("prior") > towards_context.count("prior")


def test_the_shipped_deferral_head_fills_the_slots_with_the_adapter(client):
    """examples/heads/smollm2-uppercase-deferral.safetensors on held-out facts: the joint
    answers put a word in capitals inside a lower-case sentence, which neither model alone
    does, and the report shows both models writing."""
    script = load_script("examples/train_deferral_head.py")
    questions = [f"What colour is {thing}? Answer in one sentence and write the colour in "
                 "capital letters." for thing in ("fresh grass", "coal", "chocolate")]
    questions += [f"What sound does a {animal} make? Answer in one sentence and write the "
                  "sound in capital letters." for animal in ("cow", "snake", "bee")]

    def answer(question: str, model: str = "SmolLM2-135M-Instruct", **body):
        reply = client.chat.completions.create(
            model=model, max_tokens=24, temperature=0, extra_body=body,
            messages=[{"role": "user", "content": question}])
        return reply.choices[0]

    joint = [answer(q, decoding={"method": "collaborative", "assistants": ["uppercase"],
                                 "head": "upper", "report": True}) for q in questions]
    filled = sum(script.mixed_case(c.message.content) for c in joint)
    alone = sum(script.mixed_case(answer(q, model).message.content)
                for q in questions for model in ("SmolLM2-135M-Instruct", "uppercase"))
    assert filled >= 4 and alone <= 1
    choices = [d for c in joint for d in c.model_extra["deferrals"]]
    assert set(choices) == {0, 1} and all(len(c.model_extra["deferrals"]) > 0 for c in joint)


def test_the_shipped_router_sends_each_form_to_its_expert(client):
    """examples/routers/smollm2-forms on held-out questions: the gradient feature routes each
    instruction form to the expert trained on its cluster; the cheaper hidden-state feature
    nearly always does (35/36 in docs/decoding.md: one near-tie)."""
    script = load_script("examples/train_routed_experts.py")
    report = json.loads((FORMS / "report.json").read_text())
    form_of = {f"expert-{c}": forms[0] for c, forms in enumerate(report["clusters"])}
    right = {"gradient": 0, "hidden": 0}
    for form, instruction in script.FORMS.items():
        for question in script.QUESTIONS[-2:]:
            for routing in right:
                reply = client.chat.completions.create(
                    model="SmolLM2-135M-Instruct", max_tokens=8, temperature=0,
                    messages=[{"role": "user", "content": instruction + question}],
                    extra_body={"decoding": {"method": "routed_experts", "router": "forms",
                                             "routing": routing}})
                routed = reply.model_extra["decoding"]["routed_to"]
                right[routing] += form_of[routed[0]["expert"]] == form
                assert len(routed) == 2 and sum(r["weight"] for r in routed) == \
                    pytest.approx(1.0, abs=1e-5)
    assert right["gradient"] == 6 and right["hidden"] >= 5
