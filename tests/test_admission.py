"""Everything a step could trip over is refused before a request is queued: lanes that can
never fit the slots or the adapter slots, a lane prompt past its own model's context, a
temperature head of another width, integers too large for their tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from steerserve.adapters.lora.files import load_lora_adapter
from steerserve.decoding.engine.admission import Inadmissible
from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.methods.logit_arithmetic import LogitArithmetic
from steerserve.decoding.methods.proxy_tuning import ProxyTuning
from steerserve.decoding.methods.sh2 import SH2
from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.decoding.sampling.temperature_head import (
    TemperatureHead,
    TemperatureHeadConfig,
    save_temperature_head,
)
from steerserve.server.app import build_context
from steerserve.server.settings import ServerSettings
from tests.engine_helpers import plain_request
from tests.inprocess import InProcessServer
from tests.support import make_engine
from tests.tiny_models import tiny_llama

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
PROMPT = (1, 5, 9, 13, 4, 22)


def request(method, prompt=PROMPT) -> EngineRequest:
    return EngineRequest("r", prompt, GREEDY, method)


def test_more_lanes_than_slots_is_inadmissible(llama, tokenizer):
    engine = make_engine(llama, max_num_seqs=1)
    sh2 = SH2((LaneSpec(engine.primary.name, PROMPT),), tokenizer, 2048)  # + a late lane
    with pytest.raises(Inadmissible, match="2 KV-cache slots.*has 1"):
        engine.submit(request(sh2), lambda _: None)
    engine.submit(plain_request(engine, "fits", list(PROMPT), GREEDY), lambda _: None)


def test_a_lane_past_its_own_models_context_is_inadmissible(llama, tokenizer):
    short = from_pretrained_objects(tiny_llama(len(tokenizer), seed=5), tokenizer, "short",
                                    max_model_len=8)
    engine = Engine(llama, EngineConfig(max_num_seqs=4), others=[short])
    long_prompt = tuple(range(3, 13))  # 10 tokens: fine for the base, too long for "short"
    proxy = ProxyTuning((LaneSpec(llama.name, long_prompt), LaneSpec("short", long_prompt),
                         LaneSpec(llama.name, long_prompt)))
    with pytest.raises(Inadmissible, match="'short' has 10 prompt tokens.*context is 8"):
        engine.submit(request(proxy, long_prompt), lambda _: None)


def test_more_adapters_than_lora_slots_is_inadmissible(tokenizer, tmp_path):
    own = from_pretrained_objects(tiny_llama(len(tokenizer)), tokenizer, "base")  # LoRA wraps it
    engine = make_engine(own, max_loras=1, max_lora_rank=4)
    adapters = _two_adapters(tokenizer, tmp_path, engine)
    name = engine.primary.name
    mixture = LogitArithmetic((LaneSpec(name, PROMPT), LaneSpec(name, PROMPT, adapters[0]),
                               LaneSpec(name, PROMPT, adapters[1])), (1.0, 0.5, 0.5))
    with pytest.raises(Inadmissible, match="2 LoRA adapters at once.*at most 1"):
        engine.submit(request(mixture), lambda _: None)


def _two_adapters(tokenizer, tmp_path, engine) -> list:
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
        get_peft_model(copy.deepcopy(tiny_llama(len(tokenizer))), config).save_pretrained(
            tmp_path / str(seed))
        adapters.append(load_lora_adapter(str(seed), tmp_path / str(seed),
                                          engine.primary.lora_slots.bank.linears, 4))
    return adapters


def test_a_request_waiting_for_an_adapter_slot_lets_plain_ones_pass(tokenizer, tmp_path):
    """One LoRA slot, pinned by a long request on adapter 1: a request on adapter 2 waits,
    the plain request behind it runs at once, and a later adapter-1 request keeps its place
    behind the waiting one (it would pin the slot again and starve it)."""
    own = from_pretrained_objects(tiny_llama(len(tokenizer)), tokenizer, "base")
    engine = make_engine(own, max_loras=1, max_lora_rank=4)
    first, second = _two_adapters(tokenizer, tmp_path, engine)
    long_run = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    order: list[str] = []

    def submit(request_id: str, adapter, params=GREEDY) -> None:
        engine.submit(plain_request(engine, request_id, list(PROMPT), params, adapter),
                      lambda out, rid=request_id: out.finished and order.append(rid))

    submit("holder", first, long_run)
    engine.step()
    submit("waiting", second)
    submit("plain", None)
    submit("same-adapter", first)
    while engine.has_work():
        engine.step()
    assert order.index("plain") < order.index("holder")  # it did not wait for the slot
    assert order.index("waiting") < order.index("same-adapter")


def test_a_request_larger_than_the_queue_is_a_400(llama):
    engine = make_engine(llama, max_queue=2)
    requests = [(plain_request(engine, f"r{i}", list(PROMPT), GREEDY), lambda _: None)
                for i in range(3)]
    with pytest.raises(Inadmissible, match="3 choices.*at most 2") as caught:
        engine.submit_all(requests)
    assert caught.value.field == "n"


# ---- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llama, tokenizer, tmp_path_factory):
    """A one-slot server hosting a second model of another width, with a temperature head
    for the first."""
    torch.manual_seed(0)
    narrow = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1)).eval()
    head_path = tmp_path_factory.mktemp("head") / "head.safetensors"
    save_temperature_head(TemperatureHead(TemperatureHeadConfig(64, (0.0, 1.0))), head_path)
    settings = ServerSettings(vectors_dir=None, max_num_seqs=1,
                              temperature_heads=(("head", str(head_path)),))
    ctx = build_context(settings, llama, [from_pretrained_objects(narrow, tokenizer, "narrow")])
    live = InProcessServer(ctx)
    yield live
    live.stop()


def completion(**fields) -> dict:
    body = {"model": "tiny-llama", "prompt": "Once upon a time", "max_tokens": 3,
            "temperature": 0, **fields}
    return {name: value for name, value in body.items() if value is not None}


@pytest.mark.parametrize(("body", "param", "words"), [
    (completion(decoding={"method": "sh2"}), "decoding", "--max-num-seqs"),
    (completion(prompt=[5] * 2046, max_tokens=1, decoding={"method": "sh2"}), "decoding",
     "hesitation prompt"),
    (completion(model="narrow", temperature=None,
                adaptive_temperature={"method": "learned", "head": "head"}),
     "adaptive_temperature.head", "width 64"),
    (completion(top_k=2**70), "top_k", "less than or equal"),
])
def test_refused_before_admission(server, body, param, words):
    response = server.post("/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_top_k_beyond_the_vocabulary_means_every_token(server):
    """The request that, before, ended another user's stream with an internal error."""
    plain = server.post("/v1/completions", completion(temperature=0.8, seed=3)).json()
    huge = server.post("/v1/completions", completion(temperature=0.8, seed=3, top_k=2**62))
    assert huge.status_code == 200
    assert huge.json()["choices"][0]["text"] == plain["choices"][0]["text"]
