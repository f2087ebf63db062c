"""Multi-model decoding over HTTP: several hosted models, the `decoding` option, scoring under
a method, composition with adapters and steering, and refused inputs."""

from __future__ import annotations

import copy

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.support import API_KEY, LiveServer
from tests.tiny_models import tiny_llama, tiny_tokenizer

PROMPT = "Once upon a time there was a small town"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer, tiny_model_dir):
    root = tmp_path_factory.mktemp("methods")
    expert = tiny_llama(len(tokenizer), seed=21)
    expert.save_pretrained(root / "expert")
    tokenizer.save_pretrained(root / "expert")
    other = tiny_tokenizer(vocab_size=300)  # a different vocabulary
    stranger = tiny_llama(len(other), seed=22)
    stranger.save_pretrained(root / "stranger")
    other.save_pretrained(root / "stranger")
    torch.manual_seed(4)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    base = tiny_llama(len(tokenizer))  # the weights of tiny_model_dir
    get_peft_model(copy.deepcopy(base), config).save_pretrained(root / "adapter")
    return {"base": tiny_model_dir, "expert": root / "expert", "stranger": root / "stranger",
            "adapter": root / "adapter"}


@pytest.fixture(scope="module")
def server(model_dirs):
    live = LiveServer(["--model", f"tiny={model_dirs['base']}",
                       "--model", f"expert={model_dirs['expert']}",
                       "--model", f"stranger={model_dirs['stranger']}",
                       "--lora", f"lora={model_dirs['adapter']}", "--dtype", "float32"],
                      api_key=API_KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)


def complete(client, decoding=None, **extra):
    body = {"ignore_eos": True, **extra}
    if decoding:
        body["decoding"] = decoding
    return client.completions.create(model=extra.pop("model", "tiny"), prompt=PROMPT,
                                     max_tokens=8, temperature=0, seed=3, extra_body=body)


def test_models_are_listed(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:3] == ["tiny", "expert", "stranger"] and "lora" in ids


def test_proxy_tuning_alpha_zero_is_plain_and_reported(client):
    plain = complete(client)
    proxy = {"method": "proxy_tuning", "expert": "expert", "anti_expert": "tiny", "alpha": 0.0}
    out = complete(client, proxy)
    assert out.choices[0].text == plain.choices[0].text
    assert out.model_extra["decoding"] == proxy
    steered = complete(client, {**proxy, "alpha": 1.0})
    expert = client.completions.create(model="expert", prompt=PROMPT, max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert steered.choices[0].text == expert.choices[0].text  # base + (expert - base)


@pytest.mark.parametrize("decoding", [
    {"method": "contrastive", "amateur": "expert", "beta": 0.5, "amateur_temperature": 0.5},
    {"method": "contrastive", "amateur": "tiny", "amateur_prefix": "last_token",
     "variant": "obrien2023"},
    {"method": "sh2", "alpha": 2.0, "key_num": 30, "mask": True},
    {"method": "dola", "layers": [0]},
    {"method": "proxy_tuning", "expert": "lora", "anti_expert": "tiny"},
])
def test_methods_stream_equals_whole_and_give_logprobs(client, decoding):
    whole = complete(client, decoding, logprobs=2)
    assert len(whole.choices[0].logprobs.token_logprobs) == 8
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8,
                                         temperature=0, stream=True, seed=3,
                                         extra_body={"ignore_eos": True, "decoding": decoding})
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == whole.choices[0].text


def test_scoring_under_a_method(client):
    def scores(decoding=None):
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True,
                                        logprobs=0, seed=3, extra_body={"decoding": decoding}
                                        if decoding else {})
        return out.choices[0].logprobs.token_logprobs[1:]

    plain = scores()
    assert scores({"method": "proxy_tuning", "expert": "expert", "anti_expert": "tiny",
                   "alpha": 0.0}) == pytest.approx(plain, abs=1e-5)
    for decoding in ({"method": "contrastive", "amateur": "expert"},
                     {"method": "sh2", "alpha": 1.0}, {"method": "dola", "layers": [0]}):
        scored = scores(decoding)
        assert len(scored) == len(plain) and scored != pytest.approx(plain, abs=1e-3)


def test_compose_with_adapter_steering_and_adaptive_temperature(client):
    out = client.chat.completions.create(
        model="lora", messages=[{"role": "user", "content": PROMPT}], max_tokens=6, seed=2,
        extra_body={"decoding": {"method": "proxy_tuning", "expert": "expert",
                                 "anti_expert": "tiny", "alpha": 0.5},
                    "steering": [{"values": [0.5] * 64, "layers": [0]}],
                    "adaptive_temperature": {"method": "edt"}, "return_temperatures": True})
    assert out.model_extra["decoding"]["method"] == "proxy_tuning"
    assert len(out.choices[0].model_extra["temperatures"]) == out.usage.completion_tokens


def arithmetic(*terms: tuple[str, float]) -> dict:
    return {"method": "logit_arithmetic",
            "terms": [{"model": model, "weight": weight} for model, weight in terms]}


def test_logit_arithmetic_recovers_plain_and_the_expert(client):
    plain = complete(client)
    assert complete(client, arithmetic(("tiny", 1.0))).choices[0].text == plain.choices[0].text
    expert = client.completions.create(model="expert", prompt=PROMPT, max_tokens=8,
                                       temperature=0, extra_body={"ignore_eos": True})
    # log p_tiny + (log p_expert - log p_tiny): the expert's distribution exactly
    out = complete(client, arithmetic(("tiny", 1.0), ("expert", 1.0), ("tiny", -1.0)))
    assert out.choices[0].text == expert.choices[0].text
    assert out.model_extra["decoding"]["terms"][1] == {"model": "expert", "weight": 1.0}


def test_logit_arithmetic_mixes_an_adapter_with_steering_streamed(client):
    mixture = arithmetic(("tiny", 0.5), ("lora", 0.5))
    body = {"decoding": mixture, "steering": [{"values": [0.5] * 64, "layers": [0]}],
            "ignore_eos": True}
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=2, seed=1,
                                      temperature=0.7, extra_body=body)
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, n=2,
                                         seed=1, temperature=0.7, stream=True, extra_body=body)
    texts = ["", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    plain = complete(client, steering=body["steering"])
    assert complete(client, mixture, steering=body["steering"]).choices[0].text != \
        plain.choices[0].text


BAD = [
    ({"method": "proxy_tuning", "expert": "expert"}, 400, "decoding.anti_expert"),
    ({"method": "proxy_tuning", "expert": "nope", "anti_expert": "tiny"}, 404,
     "decoding.expert"),
    ({"method": "proxy_tuning", "expert": "stranger", "anti_expert": "tiny"}, 400,
     "decoding.expert"),
    ({"method": "contrastive", "amateur": "expert", "key_num": 3}, 400, "decoding.key_num"),
    ({"method": "contrastive", "amateur": "expert", "alpha": 1.5}, 400, "decoding.alpha"),
    ({"method": "dola", "layers": [1], "layer_indexing": "blocks"}, 400,
     "decoding.layers"),  # 2 blocks: only block 0 is premature
    ({"method": "dola", "layers": "high", "layer_indexing": "blocks"}, 400, "decoding.layers"),
    ({"method": "dola", "layers": [2]}, 400, "decoding.layers"),  # hidden state 2 is mature
    ({"method": "dola", "relative_top": -0.1}, 400, "decoding.relative_top"),
    ({"method": "beam"}, 400, "decoding.method"),
    ({"method": "sh2", "alpha": -1}, 400, "decoding.alpha"),
    (arithmetic(("expert", 1.0)), 400, "decoding.terms"),  # the request's model is missing
    (arithmetic(("tiny", 1.0), ("nope", 1.0)), 404, "decoding.terms.1.model"),
    (arithmetic(("tiny", 1.0), ("stranger", 1.0)), 400, "decoding.terms.1.model"),
    (arithmetic(("tiny", 1000.0)), 400, "decoding.terms.0.weight"),
    (arithmetic(*[("tiny", 1.0)] * 9), 400, "decoding.terms"),
    ({"method": "logit_arithmetic", "terms": [{"model": "tiny", "weight": 1, "bias": 2}]},
     400, "decoding.terms.0.bias"),
    ({"method": "logit_arithmetic", "terms": []}, 400, "decoding.terms"),
]


@pytest.mark.parametrize(("decoding", "status", "param"), BAD)
def test_bad_decoding_is_refused(server, decoding, status, param):
    response = httpx.post(f"{server.base_url}/v1/completions", headers=server.headers(),
                          json={"model": "tiny", "prompt": "Hi", "decoding": decoding},
                          timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_expert_chat_template_is_for_completions(server):
    response = httpx.post(f"{server.base_url}/v1/chat/completions", headers=server.headers(),
                          json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                "decoding": {"method": "proxy_tuning", "expert": "expert",
                                             "anti_expert": "tiny",
                                             "expert_chat_template": True}}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "decoding.expert_chat_template"


def test_scoring_refuses_unaligned_lanes(server):
    for decoding, param in (
            ({"method": "proxy_tuning", "expert": "expert", "anti_expert": "tiny",
              "expert_chat_template": True}, "decoding.expert_chat_template"),
            ({"method": "contrastive", "amateur": "tiny", "amateur_prefix": "last_token"},
             "decoding.amateur_prefix")):
        response = httpx.post(f"{server.base_url}/v1/completions", headers=server.headers(),
                              json={"model": "tiny", "prompt": "Hi there", "echo": True,
                                    "logprobs": 0, "max_tokens": 0, "decoding": decoding},
                              timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert httpx.get(f"{server.base_url}/health").json()["status"] == "ok"
