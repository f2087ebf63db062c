"""Co-LLM collaborative decoding over HTTP on tiny models: the deferral rule against a reference
loop written here (HF forwards of untouched copies), the threshold's two ends against each
model alone, reported choices, streaming, adapters as assistants, and refused inputs."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from peft import LoraConfig, get_peft_model

from steerserve.decoding.methods.deferral_head import (
    DeferralHead,
    DeferralHeadConfig,
    load_deferral_head,
    save_deferral_head,
)
from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.server.app import build_context
from steerserve.server.settings import ServerSettings
from tests.inprocess import InProcessServer
from tests.tiny_models import tiny_llama

PROMPT = "Once upon a time there was a small town"
TOKENS = 12


def random_head(hidden: int, assistants: int, seed: int) -> DeferralHead:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(assistants, hidden, generator=generator)
    return DeferralHead(DeferralHeadConfig(hidden, tuple(f"a{i}" for i in range(assistants))),
                        weight, torch.zeros(assistants))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama, tokenizer):
    root = tmp_path_factory.mktemp("collaborative")
    hidden = llama.model.config.hidden_size
    head = random_head(hidden, 1, seed=5)
    save_deferral_head(head, root / "one.safetensors")
    save_deferral_head(random_head(hidden, 2, seed=6), root / "two.safetensors")
    assistant = tiny_llama(len(tokenizer), seed=21)
    torch.manual_seed(4)
    lora = get_peft_model(copy.deepcopy(tiny_llama(len(tokenizer))), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "adapter")
    settings = ServerSettings(
        vectors_dir=None, max_num_seqs=8, loras=(("lora", str(root / "adapter")),),
        deferral_heads=(("one", str(root / "one.safetensors")),
                        ("two", str(root / "two.safetensors"))))
    others = [from_pretrained_objects(copy.deepcopy(assistant), tokenizer, "expert")]
    live = InProcessServer(build_context(settings, llama, others))
    yield live, head, assistant
    live.stop()


@pytest.fixture(scope="module")
def client(setup) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{setup[0].base_url}/v1", api_key="x", max_retries=0)


def collaborative(client, model: str = "tiny-llama", **decoding):
    body = {"method": "collaborative", "assistants": ["expert"], "head": "one", **decoding}
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS,
                                     temperature=0, extra_body={"ignore_eos": True,
                                                                "decoding": body})


def reference_loop(base, assistant, head: DeferralHead, prompt: list[int],
                   threshold: float) -> tuple[list[int], list[int]]:
    """Greedy Co-LLM: per token the head reads the base's final normed state; past the
    threshold the assistant's argmax is taken, else the base's."""
    ids, choices = list(prompt), []
    with torch.no_grad():
        for _ in range(TOKENS):
            x = torch.tensor([ids])
            state = base.model(x).last_hidden_state[0, -1]
            weight, bias = head.weight[0], head.bias[0]
            defer = torch.sigmoid(state @ weight + bias).item()
            chooser = assistant if defer > threshold else base
            ids.append(int(chooser(x).logits[0, -1].argmax()))
            choices.append(int(defer > threshold))
    return ids[len(prompt):], choices


def test_greedy_tokens_and_choices_follow_the_reference_loop(client, setup, llama_reference,
                                                             tokenizer):
    _, head, assistant = setup
    prompt = tokenizer(PROMPT)["input_ids"]
    tokens, choices = reference_loop(llama_reference, assistant, head, prompt, 0.5)
    assert 0 < sum(choices) < TOKENS  # the random head really switches models
    reply = collaborative(client, report=True)
    assert reply.choices[0].text == tokenizer.decode(tokens)
    assert reply.choices[0].model_extra["deferrals"] == choices


def test_the_threshold_ends_are_each_model_alone(client):
    def alone(model: str) -> str:
        return client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS,
                                         temperature=0, extra_body={"ignore_eos": True}
                                         ).choices[0].text
    assert collaborative(client, threshold=0.0).choices[0].text == alone("expert")
    assert collaborative(client, threshold=1.0).choices[0].text == alone("tiny-llama")
    assert "deferrals" not in collaborative(client).choices[0].model_extra


def test_an_adapter_assists_and_two_assistants_share_a_head(client):
    adapter = collaborative(client, assistants=["lora"], threshold=0.0).choices[0].text
    assert adapter == client.completions.create(
        model="lora", prompt=PROMPT, max_tokens=TOKENS, temperature=0,
        extra_body={"ignore_eos": True}).choices[0].text
    two = collaborative(client, assistants=["expert", "lora"], head="two", report=True)
    assert set(two.choices[0].model_extra["deferrals"]) <= {0, 1, 2}


def test_the_stream_reports_the_same_choices(setup):
    live = setup[0]
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "decoding": {"method": "collaborative", "assistants": ["expert"], "head": "one",
                         "report": True}}
    whole = live.post("/v1/chat/completions", body).json()["choices"][0]
    client = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0)
    text, choices = "", []
    for chunk in client.chat.completions.create(
            stream=True, **{k: v for k, v in body.items() if k in ("model", "messages",
                                                                    "max_tokens",
                                                                    "temperature")},
            extra_body={"ignore_eos": True, "decoding": body["decoding"]}):
        text += chunk.choices[0].delta.content or ""
        choices += (chunk.choices[0].model_extra or {}).get("deferrals", [])
    assert text == whole["message"]["content"] and choices == whole["deferrals"]
    assert len(choices) == TOKENS


BAD = [
    ({"head": "nope"}, 404, "decoding.head"),
    ({"assistants": ["expert", "lora"]}, 400, "decoding.assistants"),
    ({"assistants": ["nope"]}, 404, "decoding.assistants.0"),
    ({"assistants": []}, 400, "decoding.assistants"),
    ({"threshold": 1.5}, 400, "decoding.threshold"),
    ({"report": "maybe"}, 400, "decoding.report"),
    ({"threshhold": 0.5}, 400, "decoding.threshhold"),
]


@pytest.mark.parametrize(("decoding", "status", "param"), BAD)
def test_bad_fields_are_refused_naming_them(setup, decoding, status, param):
    reply = setup[0].post("/v1/completions", {
        "model": "tiny-llama", "prompt": "Hi", "decoding": {
            "method": "collaborative", "assistants": ["expert"], "head": "one", **decoding}})
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


def test_prompt_scoring_is_refused(setup):
    reply = setup[0].post("/v1/completions", {
        "model": "tiny-llama", "prompt": "Hi", "echo": True, "logprobs": 1, "max_tokens": 1,
        "decoding": {"method": "collaborative", "assistants": ["expert"], "head": "one"}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "decoding"


def test_head_files_are_checked(tmp_path):
    head = random_head(8, 1, seed=1)
    save_deferral_head(head, tmp_path / "h.safetensors")
    assert torch.equal(load_deferral_head(tmp_path / "h.safetensors").weight, head.weight)
    with pytest.raises(ValueError, match="width"):
        load_deferral_head(tmp_path / "h.safetensors", hidden_size=16)
    (tmp_path / "h.pt").write_bytes(b"\x80\x04K.")
    with pytest.raises(ValueError, match="safetensors"):
        load_deferral_head(tmp_path / "h.pt")
    bad = DeferralHead(head.config, torch.full((1, 8), float("nan")), torch.zeros(1))
    save_deferral_head(bad, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="finite"):
        load_deferral_head(tmp_path / "nan.safetensors")


def test_unknown_server_heads_refuse_to_start(tmp_path, llama):
    (tmp_path / "x.safetensors").write_bytes(b"not a file")
    with pytest.raises(SystemExit, match="--deferral-head"):
        build_context(ServerSettings(vectors_dir=None, deferral_heads=(
            ("x", str(tmp_path / "x.safetensors")),)), llama)


def test_the_method_is_in_the_openapi_schema(setup):
    schema = httpx.get(f"{setup[0].base_url}/openapi.json", timeout=10).text
    assert "collaborative" in schema and "threshold" in schema


def test_requests_in_one_batch_get_what_they_get_alone(setup):
    """Different heads, thresholds and a plain request decoded together: each request's tokens
    and choices are those it gets alone (the choice is made per row)."""
    live = setup[0]
    bodies = [{"assistants": ["expert"], "head": "one", "threshold": t, "report": True}
              for t in (0.0, 0.5, 1.0)]
    bodies.append({"assistants": ["expert", "lora"], "head": "two", "report": True})

    def run(decoding: dict | None) -> dict:
        body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": TOKENS,
                "temperature": 0, "ignore_eos": True}
        if decoding is not None:
            body["decoding"] = {"method": "collaborative", **decoding}
        choice = live.post("/v1/completions", body).json()["choices"][0]
        return {"text": choice["text"], "deferrals": choice.get("deferrals")}

    alone = [run(b) for b in [*bodies, None]]
    with ThreadPoolExecutor(len(alone)) as pool:
        together = list(pool.map(run, [*bodies, None]))
    assert together == alone
    assert len({tuple(a["deferrals"]) for a in alone[:3]}) > 1  # the thresholds matter


def test_the_responses_api_refuses_a_per_token_report(setup):
    body = {"model": "tiny-llama", "input": PROMPT, "max_output_tokens": 4,
            "decoding": {"method": "collaborative", "assistants": ["expert"], "head": "one"}}
    assert setup[0].post("/v1/responses", body).status_code == 200
    body["decoding"]["report"] = True
    refused = setup[0].post("/v1/responses", body)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "decoding"
