"""Failures stay with their request: a fault injected inside the batched step (through a
decoding method registered as a plug-in) fails that request alone, every other request gets
exactly the tokens it gets without it, and an engine that dies answers 503 everywhere."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import ClassVar

import httpx
import pytest

from steerserve.decoding.methods.base import DecodingMethod, LanePlanner, Mix, lane, param
from steerserve.decoding.methods.contrastive import Contrastive
from steerserve.decoding.methods.registry import BUILTIN, MethodRegistry
from steerserve.decoding.request import EngineRequest, FinishReason, LaneSpec
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.server.app import build_context
from steerserve.server.settings import ServerSettings
from tests.engine_helpers import Collector, plain_request, run_to_completion
from tests.inprocess import InProcessServer
from tests.support import make_engine

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=42, ignore_eos=True)
PROMPTS = [[1, 5, 9, 13, 4, 22], [1, 7, 3, 60, 61], [1, 30, 31, 32, 33], [1, 2, 3]]


@dataclass(frozen=True)
class FaultyParams:
    explode: bool = param(False, doc="raise inside the batched step")
    when: str = param("step", doc="'step': before sampling; 'scoring': after it")


@dataclass(frozen=True, eq=False)
class Faulty(DecodingMethod):
    """The request model's log-softmax (plain decoding's tokens), or a fault in the step."""

    name: ClassVar[str] = "faulty"
    Params: ClassVar[type] = FaultyParams
    armed: ClassVar[bool] = True  # the test may hold the fault back
    lanes: tuple[LaneSpec, ...]
    explode: bool = False
    when: str = "step"

    @classmethod
    def build(cls, params: FaultyParams, planner: LanePlanner) -> Faulty:
        return cls((planner.base,), params.explode, params.when)

    def mix(self) -> Mix:
        return Mix((lane(0),), log_softmax=True)

    @classmethod
    def step_rows(cls, members, early_exits):
        if cls.armed and any(m.explode and m.when == "step" for m, _ in members):
            raise RuntimeError("injected fault")
        return [None] * len(members)

    def prompt_rows(self, view, count, early_exits):
        if self.armed and self.explode and self.when == "scoring":
            raise RuntimeError("injected fault")  # after the batch's tokens were sampled
        return None


def faulty(engine, request_id: str, prompt: list[int], when: str = "step") -> EngineRequest:
    params = SamplingParams(**{**GREEDY.__dict__, "prompt_logprobs": 0})
    return EngineRequest(request_id, tuple(prompt), params, Faulty(
        (LaneSpec(engine.primary.name, tuple(prompt)),), explode=True, when=when))


def healthy_requests(engine) -> list[EngineRequest]:
    name = engine.primary.name
    contrastive = Contrastive((LaneSpec(name, tuple(PROMPTS[2])),
                               LaneSpec(name, tuple(PROMPTS[2][-1:]))))
    return [plain_request(engine, "greedy", PROMPTS[0], GREEDY),
            plain_request(engine, "seeded", PROMPTS[1], SEEDED),
            EngineRequest("contrastive", tuple(PROMPTS[2]), GREEDY, contrastive)]


def alone(engine, request: EngineRequest) -> list[int]:
    collector = Collector()
    collector.submit_request(engine, request)
    run_to_completion(engine)
    return collector.tokens(request.request_id)


@pytest.mark.parametrize("when", ["step", "scoring"])
@pytest.mark.parametrize("joins", ["at once", "mid-flight"])
def test_a_fault_fails_its_request_alone_and_others_are_unchanged(llama, joins, when):
    engine = make_engine(llama)
    expected = {r.request_id: alone(engine, r) for r in healthy_requests(engine)}
    collector = Collector()
    for request in healthy_requests(engine):
        collector.submit_request(engine, request)
    if joins == "mid-flight":  # the others are decoding when the fault hits
        for _ in range(3):
            engine.step()
    collector.submit_request(engine, faulty(engine, "bad", PROMPTS[3], when))
    run_to_completion(engine)
    last = collector.last("bad")
    assert last.finish_reason == FinishReason.ERROR and last.failure.status == 500
    assert "injected fault" in last.failure.message and collector.tokens("bad") == []
    for request_id, tokens in expected.items():
        assert collector.tokens(request_id) == tokens, request_id
        assert collector.last(request_id).finish_reason == FinishReason.LENGTH
    assert engine.num_running == 0 and not engine.primary.slots.lanes
    assert engine.primary.slots.free == engine.primary.slots.num_slots


def test_a_fault_mid_decode_of_the_failing_request(llama, monkeypatch):
    engine = make_engine(llama)
    expected = {r.request_id: alone(engine, r) for r in healthy_requests(engine)}
    collector = Collector()
    monkeypatch.setattr(Faulty, "armed", False)
    for request in [*healthy_requests(engine), faulty(engine, "bad", PROMPTS[3])]:
        collector.submit_request(engine, request)
    for _ in range(4):
        engine.step()
    monkeypatch.setattr(Faulty, "armed", True)
    run_to_completion(engine)
    assert collector.last("bad").finish_reason == FinishReason.ERROR
    assert len(collector.tokens("bad")) == 4  # what it had before the fault
    for request_id, tokens in expected.items():
        assert collector.tokens(request_id) == tokens, request_id


# ---- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llama):
    registry = MethodRegistry((*BUILTIN, Faulty))
    ctx = build_context(ServerSettings(vectors_dir=None, max_num_seqs=8), llama,
                        methods=registry)
    live = InProcessServer(ctx)
    yield live
    live.stop()


def body(explode: bool | None = None, stream: bool = False, max_tokens: int = 60) -> dict:
    extra = {} if explode is None else {"decoding": {"method": "faulty", "explode": explode}}
    return {"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream, **extra}


def streamed_text(response: httpx.Response) -> tuple[str, list[dict]]:
    text, errors = "", []
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            errors.append(event["error"])
        else:
            text += "".join(choice["text"] for choice in event["choices"])
    return text, errors


def test_http_fault_is_a_500_for_its_request_and_others_stream_on(server):
    long = 400  # the healthy requests are still decoding when the faulty ones come
    expected = server.post("/v1/completions", body(max_tokens=long)).json()["choices"][0]["text"]
    results: dict[str, object] = {}

    def healthy_stream():
        with httpx.stream("POST", f"{server.base_url}/v1/completions",
                          json=body(stream=True, max_tokens=long), timeout=60) as response:
            results["stream"] = streamed_text(response)

    def healthy_json():
        response = server.post("/v1/completions", body(max_tokens=long))
        results["json"] = response.json()["choices"][0]["text"]

    threads = [threading.Thread(target=healthy_stream), threading.Thread(target=healthy_json)]
    for thread in threads:
        thread.start()
    while server.engine.num_running < 2:
        time.sleep(0.005)
    failed = server.post("/v1/completions", body(explode=True))
    with httpx.stream("POST", f"{server.base_url}/v1/completions",
                      json=body(explode=True, stream=True), timeout=60) as response:
        assert response.status_code == 200  # the status went out with the first byte
        failed_text, errors = streamed_text(response)
    for thread in threads:
        thread.join(60)
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "internal_server_error"
    assert "injected fault" in failed.json()["error"]["message"]
    assert errors and "injected fault" in errors[0]["message"] and failed_text == ""
    assert results["stream"] == (expected, []) and results["json"] == expected
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_stream_error_ends_with_done(server):
    with httpx.stream("POST", f"{server.base_url}/v1/completions",
                      json=body(explode=True, stream=True), timeout=60) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert "error" in json.loads(lines[-2][6:]) and lines[-1] == "data: [DONE]"


def test_engine_death_answers_503_at_once(llama):
    ctx = build_context(ServerSettings(vectors_dir=None, max_num_seqs=1,
                                       allow_runtime_vectors=True), llama)
    live = InProcessServer(ctx)
    try:
        outcome: dict[str, object] = {}

        def running_stream():
            with httpx.stream("POST", f"{live.base_url}/v1/completions",
                              json=body(stream=True, max_tokens=1500), timeout=60) as response:
                outcome["stream"] = streamed_text(response)

        def waiting_json():
            outcome["json"] = live.post("/v1/completions", body(max_tokens=5))

        first = threading.Thread(target=running_stream)
        first.start()
        while live.engine.num_running < 1:
            time.sleep(0.005)
        second = threading.Thread(target=waiting_json)
        second.start()
        while live.engine.num_waiting < 1:  # no slot: it waits behind the stream
            time.sleep(0.005)

        def broken(results):
            raise RuntimeError("injected engine fault")

        live.engine.output.advance_lanes = broken  # outside any one request's work
        first.join(30)
        second.join(30)
        _, errors = outcome["stream"]
        assert errors and "injected engine fault" in errors[0]["message"]
        assert outcome["json"].status_code == 503
        after = live.post("/v1/completions", body(max_tokens=2))
        assert after.status_code == 503 and after.json()["error"]["code"] == "engine_unavailable"
        extraction = live.post("/v1/steering/vectors", {
            "name": "v", "model": "tiny-llama", "positive": ["good", "fine"],
            "negative": ["bad", "poor"], "method": "mean_diff"})
        assert extraction.status_code == 503, extraction.text
        health = httpx.get(f"{live.base_url}/health")
        assert health.status_code == 503 and "injected engine fault" in health.json()["reason"]
    finally:
        live.stop()
