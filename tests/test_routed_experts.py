"""Routed adapter ensembles (ELREA) over HTTP on a tiny model: the router's choice and weights
against gradient and hidden-state features computed here through peft, the combination
against a reference loop over the experts' logits, and refused inputs."""

from __future__ import annotations

import copy
import shutil
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from steerserve.adapters.routing import RouterConfig, load_router, save_router
from steerserve.adapters.routing.features import ROUTING_TOKENS
from steerserve.server.app import build_context
from steerserve.server.settings import ServerSettings
from tests.inprocess import InProcessServer
from tests.tiny_models import tiny_llama

PROMPTS = ["Once upon a time there was", "The weather today is", "In the beginning the"]
TEMPERATURE = 0.5
TOKENS = 8


def lora_dir(path, vocab: int, seed: int):
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(vocab), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(path)
    return path


def oracle_gradient(feature: PeftModel, prompt: list[int]) -> torch.Tensor:
    """As examples/train_routed_experts.py computes it: the prompt's loss gradient w.r.t. the
    top layer's lora_B weights, in name order, unit length."""
    named = dict(feature.named_parameters())
    names = sorted(n for n in named if "layers.1." in n and "lora_B" in n)
    for name in names:
        named[name].requires_grad_(True)
    ids = torch.tensor([prompt])
    loss = feature(input_ids=ids, labels=ids).loss
    flat = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [named[n] for n in names])])
    return flat / flat.norm()


def oracle_hidden(base, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        state = base(input_ids=torch.tensor([prompt]),
                     output_hidden_states=True).hidden_states[-1][0].mean(0)
    return state / state.norm()


@pytest.fixture(scope="module")
def routed(tmp_path_factory, llama, llama_reference, tokenizer):
    root = tmp_path_factory.mktemp("routed")
    vocab = len(tokenizer)
    router_dir = root / "router"
    lora_dir(router_dir / "feature-adapter", vocab, seed=30)
    experts = {f"e{i}": lora_dir(root / f"e{i}", vocab, seed=31 + i) for i in range(3)}
    feature = PeftModel.from_pretrained(copy.deepcopy(llama_reference),
                                        str(router_dir / "feature-adapter"))
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    gradients = torch.stack([oracle_gradient(feature, p) for p in prompts])
    hidden = torch.stack([oracle_hidden(llama_reference, p) for p in prompts])
    # Gradient routing sends prompt i to expert i; hidden routing to expert (i + 1) % 3.
    save_router(router_dir / "router.safetensors", gradients, hidden.roll(1, dims=0),
                RouterConfig(tuple(experts), feature_layer=1, temperature=TEMPERATURE))
    settings = ServerSettings(vectors_dir=None, max_num_seqs=8,
                              loras=tuple((n, str(p)) for n, p in experts.items()),
                              routers=(("r", str(router_dir)),))
    live = InProcessServer(build_context(settings, llama))
    yield live, prompts, gradients, hidden, experts
    live.stop()


def complete(live, prompt: str, **decoding):
    return live.post("/v1/completions", {
        "model": "tiny-llama", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
        "ignore_eos": True, "decoding": {"method": "routed_experts", "router": "r",
                                         **decoding}})


def test_gradient_routing_picks_and_weighs_as_the_features_say(routed):
    live, prompts, gradients, _, _ = routed
    for i, prompt in enumerate(PROMPTS):
        reply = complete(live, prompt, top_k=3)
        assert reply.status_code == 200, reply.text
        routed_to = reply.json()["decoding"]["routed_to"]
        similarity = gradients @ gradients[i]
        values, order = similarity.topk(3)
        weights = (values / TEMPERATURE).softmax(-1)
        assert [r["expert"] for r in routed_to] == [f"e{j}" for j in order.tolist()]
        assert [r["weight"] for r in routed_to] == pytest.approx(weights.tolist(), abs=1e-4)


def test_hidden_routing_uses_the_hidden_centroids(routed):
    live = routed[0]
    for i, prompt in enumerate(PROMPTS):
        routed_to = complete(live, prompt, top_k=1, routing="hidden").json()["decoding"][
            "routed_to"]
        assert routed_to == [{"expert": f"e{(i + 1) % 3}", "weight": 1.0}]


def test_the_ensemble_sums_the_experts_logits_with_the_weights(routed, llama_reference,
                                                                tokenizer):
    live, prompts, gradients, _, experts = routed
    reply = complete(live, PROMPTS[0]).json()
    chosen = [(r["expert"], r["weight"]) for r in reply["decoding"]["routed_to"]]
    models = {name: PeftModel.from_pretrained(copy.deepcopy(llama_reference), str(path))
              for name, path in experts.items()}
    ids = list(prompts[0])
    with torch.no_grad():
        for _ in range(TOKENS):
            x = torch.tensor([ids])
            logits = sum(w * models[name](x).logits[0, -1] for name, w in chosen)
            ids.append(int(logits.argmax()))
    assert reply["choices"][0]["text"] == tokenizer.decode(ids[len(prompts[0]):])


BAD = [
    ({"router": "nope"}, 404, "decoding.router"),
    ({"top_k": 4}, 400, "decoding.top_k"),
    ({"top_k": 0}, 400, "decoding.top_k"),
    ({"routing": "random"}, 400, "decoding.routing"),
]


@pytest.mark.parametrize(("decoding", "status", "param"), BAD)
def test_bad_fields_are_refused_naming_them(routed, decoding, status, param):
    reply = complete(routed[0], "Hi", **decoding)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


def test_router_files_and_experts_are_checked_at_start(routed, tmp_path, llama):
    live, *_ = routed
    router_dir = live.ctx.settings.routers[0][1]
    with pytest.raises(SystemExit, match="expert 'e0' is not served"):
        build_context(ServerSettings(vectors_dir=None, routers=(("r", router_dir),)), llama)
    with pytest.raises(ValueError, match="router.safetensors"):
        load_router(tmp_path, 64, 2)
    (tmp_path / "feature-adapter").mkdir()
    save_router(tmp_path / "router.safetensors", torch.ones(2, 8), torch.ones(2, 32),
                RouterConfig(("a", "b"), feature_layer=1))
    with pytest.raises(ValueError, match="hidden states 64"):
        load_router(tmp_path, 64, 2)
    with pytest.raises(ValueError, match="feature_layer"):
        load_router(tmp_path, 32, 1)


def test_a_long_prompt_is_routed_by_its_last_tokens(routed, llama_reference, tokenizer):
    live, _, gradients, _, _ = routed
    text = " ".join([PROMPTS[1]] * 120)
    tokens = tokenizer(text)["input_ids"]
    assert len(tokens) > ROUTING_TOKENS
    feature = PeftModel.from_pretrained(copy.deepcopy(llama_reference),
                                        str(live.ctx.settings.routers[0][1]) +
                                        "/feature-adapter")
    similarity = gradients @ oracle_gradient(feature, tokens[-ROUTING_TOKENS:])
    values, order = similarity.topk(2)
    reply = live.post("/v1/completions", {
        "model": "tiny-llama", "prompt": text, "max_tokens": 1,
        "decoding": {"method": "routed_experts", "router": "r"}}).json()
    routed_to = reply["decoding"]["routed_to"]
    assert [r["expert"] for r in routed_to] == [f"e{j}" for j in order.tolist()]
    assert [r["weight"] for r in routed_to] == pytest.approx(
        (values / TEMPERATURE).softmax(-1).tolist(), abs=1e-4)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "e0", "prompt": "Hi there"}, "decoding.router"),  # an adapter: not the router's
    ({"model": "tiny-llama", "prompt": ["Hi there", "Bye now"]}, "prompt"),
])
def test_requests_the_router_cannot_serve_are_refused(routed, body, param):
    reply = routed[0].post("/v1/completions", {
        **body, "max_tokens": 2, "decoding": {"method": "routed_experts", "router": "r"}})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_a_one_token_prompt_routes_by_hidden_state_only(routed):
    live = routed[0]
    body = {"model": "tiny-llama", "prompt": [5], "max_tokens": 2,
            "decoding": {"method": "routed_experts", "router": "r"}}
    refused = live.post("/v1/completions", body)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "decoding.routing"
    body["decoding"]["routing"] = "hidden"
    assert live.post("/v1/completions", body).status_code == 200


def test_centroids_of_another_width_stop_the_start(routed, tmp_path, llama):
    live, *_ = routed
    source = Path(live.ctx.settings.routers[0][1])
    shutil.copytree(source / "feature-adapter", tmp_path / "feature-adapter")
    save_router(tmp_path / "router.safetensors", torch.ones(3, 10), torch.ones(3, 64),
                RouterConfig(("e0", "e1", "e2"), feature_layer=1))
    with pytest.raises(SystemExit, match="centroids are 10 wide"):
        build_context(ServerSettings(vectors_dir=None, routers=(("r", str(tmp_path)),)),
                      llama)


def test_routing_runs_on_its_own_thread_and_is_kept(routed):
    live = routed[0]
    router = live.ctx.routers["r"]
    assert complete(live, "A fresh prompt to route").status_code == 200
    assert any(t.name.startswith("steerserve-routing") for t in threading.enumerate())
    kept = len(router._recent)
    assert complete(live, "A fresh prompt to route").status_code == 200
    assert len(router._recent) == kept  # the same prompt again: its routing was kept
