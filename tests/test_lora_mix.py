"""Weighted adapters per request (`lora: [{name, scale}]`): one adapter scaled, or several
resident adapters mixed, as a weighted sum of their low-rank deltas in the batched forward.
Oracle: peft's own weighted merge (`add_weighted_adapter(..., combination_type="cat")`) on an
untouched copy of the base model."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tests.support import API_KEY, LiveServer
from tests.tiny_models import tiny_llama

PROMPT = [1, 17, 23, 42, 8, 99, 5]
TOKENS = 8
ADAPTERS = {  # name: (rank, targets, seed): different targets, so the mix unites them
    "a": (4, ["q_proj", "v_proj", "down_proj"], 1),
    "b": (8, ["k_proj", "o_proj", "gate_proj", "up_proj"], 2),
    "c": (8, ["q_proj", "up_proj"], 3),
    "d": (16, ["v_proj"], 4),
}
MAX_RANK = 24


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("mix-adapters")
    base = tiny_llama(len(tokenizer))
    for name, (rank, targets, seed) in ADAPTERS.items():
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                            init_lora_weights=False)
        get_peft_model(copy.deepcopy(base), config).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dirs):
    args = ["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--dtype",
            "float32", "--max-loras", "3", "--max-lora-rank", str(MAX_RANK)]
    for name in ADAPTERS:
        args += ["--lora", f"{name}={adapter_dirs / name}"]
    live = LiveServer(args, api_key=API_KEY)
    yield live
    live.stop()


def peft_greedy(tokenizer, adapter_dirs, weights: dict[str, float]) -> str:
    base = tiny_llama(len(tokenizer))
    names = list(weights)
    model = PeftModel.from_pretrained(base, adapter_dirs / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs / name, adapter_name=name)
    model.add_weighted_adapter(names, list(weights.values()), "merged",
                               combination_type="cat")
    model.set_adapter("merged")
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():  # ignore_eos on the server: no stop at EOS here either
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return tokenizer.decode(out[0, len(PROMPT):], skip_special_tokens=True)


def complete(server, lora: list[dict] | None, model: str = "tiny") -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True}
    if lora is not None:
        body["lora"] = lora
    return httpx.post(f"{server.base_url}/v1/completions", json=body,
                      headers=server.headers(), timeout=60)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


CASES = {
    "scaled": [{"name": "a", "scale": 0.5}],
    "mixed": [{"name": "a", "scale": 0.7}, {"name": "b", "scale": -0.4}],
    "three": [{"name": "a", "scale": 1.0}, {"name": "b", "scale": 0.3},
              {"name": "c", "scale": 0.0}],
}


@pytest.mark.parametrize("case", CASES)
def test_weighted_adapters_equal_peft_weighted_merge(server, tokenizer, adapter_dirs, case):
    terms = CASES[case]
    expected = peft_greedy(tokenizer, adapter_dirs, {t["name"]: t["scale"] for t in terms})
    assert text(complete(server, terms)) == expected


def test_rows_of_one_batch_differ(server, tokenizer, adapter_dirs):
    jobs = [None, CASES["scaled"], CASES["mixed"], [{"name": "b", "scale": 2.0}]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda lora: text(complete(server, lora)), jobs))
    assert together[0] == text(complete(server, None))
    assert together[1] == peft_greedy(tokenizer, adapter_dirs, {"a": 0.5})
    assert together[2] == peft_greedy(tokenizer, adapter_dirs, {"a": 0.7, "b": -0.4})
    assert together[3] == peft_greedy(tokenizer, adapter_dirs, {"b": 2.0})
    assert len(set(together)) == 4


def test_scale_one_is_the_adapter_itself(server):
    assert text(complete(server, [{"name": "b", "scale": 1.0}])) == text(
        complete(server, None, model="b"))


@pytest.mark.parametrize("lora,model,status,param", [
    ([{"name": "nope"}], "tiny", 404, "lora.0.name"),
    ([{"name": "a", "scale": 1e3}], "tiny", 400, "lora.0.scale"),
    ([{"name": "a", "scale": float("nan")}], "tiny", 400, "lora.0.scale"),
    ([{"name": "a"}, {"name": "a"}], "tiny", 400, "lora"),
    ([{"name": "a"}, {"name": "b"}, {"name": "d"}], "tiny", 400, "lora"),  # rank 28 > 24
    ([{"name": "a"}], "b", 400, "lora"),  # an adapter in `model` too
    ([], "tiny", 400, "lora"),
])
def test_refused_with_the_field(server, lora, model, status, param):
    body = {"model": model, "prompt": "Hi", "max_tokens": 2, "lora": lora}
    content = json.dumps(body).encode()  # NaN as JSON's extension NaN, as some clients send
    response = httpx.post(f"{server.base_url}/v1/completions", content=content,
                          headers={**server.headers(), "Content-Type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_more_adapters_than_max_loras_is_refused(server):
    terms = [{"name": n, "scale": 0.1} for n in ADAPTERS]  # 4 > --max-loras 3
    response = complete(server, terms)
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora"
