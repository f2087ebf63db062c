"""SAE features over HTTP: `--sae` at start, steering items naming a feature (with vectors in
the same request), bad items refused naming the field, and the interpretation routes checked
against activations computed here with transformers on the same model files."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support import API_KEY, LiveServer
from tests.test_sae import D_IN, random_sae_tensors, write_saelens

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 8,
        "temperature": 0}
TEXT = "Once upon a time there was a small town by the sea."


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sae") / "s"
    tensors = random_sae_tensors(21)
    write_saelens(directory, tensors, "blocks.1.hook_resid_post")
    return directory, tensors


@pytest.fixture(scope="module")
def server(tiny_model_dir, sae_dir):
    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--dtype", "float32", "--sae", f"s={sae_dir[0]}",
                       "--max-prefill-tokens", "64"], api_key=API_KEY)
    yield live
    live.stop()


def post(server, path: str, body) -> httpx.Response:
    content = body if isinstance(body, str) else None
    return httpx.post(f"{server.base_url}{path}", headers={**HEADERS, "content-type":
                      "application/json"}, json=None if content else body, content=content,
                      timeout=60)


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_saes_are_listed(server):
    data = httpx.get(f"{server.base_url}/v1/saes", headers=HEADERS).json()["data"]
    assert [(d["id"], d["layer"], d["d_in"], d["d_sae"], d["hook_name"]) for d in data] == \
        [("s", 1, D_IN, 96, "blocks.1.hook_resid_post")]


def test_feature_steering_changes_the_text_and_composes_with_a_vector(server):
    plain = text(post(server, "/v1/completions", BODY))
    added = text(post(server, "/v1/completions", {**BODY, "steering": [
        {"sae": "s", "feature": 4, "scale": 8.0}]}))
    clamped = text(post(server, "/v1/completions", {**BODY, "steering": [
        {"sae": "s", "feature": 4, "clamp": 6.0}]}))
    both = text(post(server, "/v1/completions", {**BODY, "steering": [
        {"sae": "s", "feature": 4, "scale": 8.0},
        {"values": [0.5] * D_IN, "layers": [0], "scale": 3.0}]}))
    assert len({plain, added, clamped, both}) == 4
    assert added == text(post(server, "/v1/completions", {**BODY, "steering": [
        {"sae": "s", "feature": 4, "scale": 8.0}]}))  # deterministic


@pytest.mark.parametrize(("item", "status", "param"), [
    ({"sae": "missing", "feature": 1}, 404, "steering.0.sae"),
    ({"sae": "s", "feature": 96}, 400, "steering.0.feature"),
    ({"sae": "s"}, 400, "steering.0.feature"),
    ({"sae": "s", "feature": 1, "scale": 2, "clamp": 1}, 400, "steering.0.clamp"),
    ({"sae": "s", "feature": 1, "layers": [0]}, 400, "steering.0.layers"),
    ({"sae": "s", "feature": 1, "mode": "ablate"}, 400, "steering.0.mode"),
    ({"vector": "v", "feature": 1}, 400, "steering.0.feature"),
    ({"sae": "s", "feature": -1}, 400, "steering.0.feature"),
    ({"sae": "s", "feature": 1, "clamp": 1e300}, 400, "steering.0.clamp"),
])
def test_bad_feature_items_are_refused_naming_the_field(server, item, status, param):
    response = post(server, "/v1/completions", {**BODY, "steering": [item]})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_non_finite_clamp_is_refused(server):
    raw = ('{"model": "tiny", "prompt": "hi", "max_tokens": 2, '
           '"steering": [{"sae": "s", "feature": 1, "clamp": NaN}]}')
    response = post(server, "/v1/completions", raw)
    assert response.status_code == 400
    assert "steering" in (response.json()["error"]["param"] or "")


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, sae_dir):
    """Feature activations of TEXT computed here: transformers' block output on the same
    model files, then SAELens's encode written out."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tokenizer(TEXT)["input_ids"]
    found = []  # block 1's output (HF's last hidden_states entry has the final norm applied)
    model.model.layers[1].register_forward_hook(lambda m, a, out: found.append(
        out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(torch.tensor([ids]))
    hidden = found[0][0]
    t = sae_dir[1]
    return ids, torch.relu((hidden - t["b_dec"]) @ t["W_enc"] + t["b_enc"])


def test_top_features_per_token_equal_transformers(server, oracle):
    ids, acts = oracle
    response = post(server, "/v1/saes/s/top_features", {"input": TEXT, "top_k": 3})
    assert response.status_code == 200, response.text
    tokens = response.json()["tokens"]
    assert [t["token_id"] for t in tokens] == ids
    for s, token in enumerate(tokens):
        expected = acts[s].topk(3)
        got = [f["feature"] for f in token["features"]]
        assert got == [int(j) for j, v in zip(expected.indices, expected.values,
                                              strict=True) if v > 0]
        torch.testing.assert_close(torch.tensor([f["activation"] for f in token["features"]]),
                                   expected.values[:len(got)], rtol=1e-4, atol=1e-4)


def test_where_a_feature_fires_equals_transformers(server, oracle):
    ids, acts = oracle
    j = int(acts.sum(0).argmax())
    body = post(server, f"/v1/saes/s/features/{j}", {"input": TEXT, "threshold": 0.1}).json()
    torch.testing.assert_close(torch.tensor([t["activation"] for t in body["tokens"]]),
                               acts[:, j], rtol=1e-4, atol=1e-4)
    assert [t["position"] for t in body["fires_at"]] == \
        [s for s in range(len(ids)) if acts[s, j] > 0.1]


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/saes/nope/top_features", {"input": "hi"}, 404, "name"),
    ("/v1/saes/s/features/96", {"input": "hi"}, 400, "feature"),
    ("/v1/saes/s/top_features", {"input": "word " * 200}, 400, "input"),
    ("/v1/saes/s/top_features", {"input": "hi", "top_k": 0}, 400, "top_k"),
    ("/v1/saes/s/top_features", {"input": "hi", "extra": 1}, 400, "extra"),
])
def test_interpretation_routes_refuse_bad_input(server, path, body, status, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_an_sae_of_another_width_stops_the_start(tiny_model_dir, tmp_path):
    tensors = {k: v for k, v in random_sae_tensors(1).items()}
    tensors = {"W_enc": tensors["W_enc"][:32], "b_enc": tensors["b_enc"],
               "W_dec": tensors["W_dec"][:, :32], "b_dec": tensors["b_dec"][:32]}
    write_saelens(tmp_path / "w", tensors, "blocks.0.hook_resid_post", d_in=32)
    with pytest.raises(RuntimeError, match="width 32"):
        LiveServer(["--model", str(tiny_model_dir), "--dtype", "float32",
                    "--sae", f"w={tmp_path / 'w'}"])
