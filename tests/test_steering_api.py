"""Activation steering over HTTP: a repeng-trained GGUF vector gives repeng's logits, the
extraction endpoint gives repeng's directions, vector management, and refused inputs."""

from __future__ import annotations

import gguf
import httpx
import numpy as np
import openai
import pytest
import torch
from repeng import ControlModel, ControlVector, DatasetEntry
from repeng.extract import read_representations
from safetensors.torch import load, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support import API_KEY, LiveServer

PAIRS = [
    DatasetEntry("The quick brown fox is happy", "The quick brown fox is sad"),
    DatasetEntry("Hello world! I am fine", "Hello world! I am tired"),
    DatasetEntry("Once upon a time there was joy", "Once upon a time there was gloom"),
    DatasetEntry("The capital of France is lovely", "The capital of France is grey"),
]
PROMPT = "Once upon a time there was a small town"


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.padding_side = "right"  # repeng reads the last non-padding token
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def repeng_vector(reference, tmp_path_factory):
    """A vector trained by repeng itself (pca_diff, its default layers), exported to GGUF."""
    model, tokenizer = reference
    vector = ControlVector.train(model, tokenizer, PAIRS)
    path = tmp_path_factory.mktemp("vectors") / "repeng.gguf"
    vector.export_gguf(path)
    return vector, path


@pytest.fixture(scope="module")
def server(tiny_model_dir, repeng_vector, tmp_path_factory):
    vectors_dir = tmp_path_factory.mktemp("vector-dir")
    other = {"direction.1": torch.ones(32)}  # a vector from a model with hidden size 32
    save_file(other, str(vectors_dir / "narrow.safetensors"))
    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--dtype", "float32", "--steering-vector", f"rp={repeng_vector[1]}",
                       "--vectors-dir", str(vectors_dir), "--allow-runtime-vectors"],
                      api_key=API_KEY)
    live.vectors_dir = vectors_dir
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)


def post(server, path: str, body: dict | str) -> httpx.Response:
    content = body if isinstance(body, str) else None
    return httpx.post(f"{server.base_url}{path}", headers={
        **server.headers(), "Content-Type": "application/json"}, timeout=60,
        json=None if content else body, content=content)


def echo_logprobs(client, steering=None) -> list[float]:
    extra = {"steering": steering} if steering else {}
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True,
                                    logprobs=0, extra_body=extra)
    return out.choices[0].logprobs.token_logprobs[1:]


def repeng_logprobs(model, tokenizer, vector, scale: float) -> list[float]:
    control = ControlModel(model, list(vector.directions))
    try:
        control.set_control(vector, scale)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.inference_mode():
            logp = torch.log_softmax(control(ids).logits[0].float(), -1)
        return logp[:-1].gather(1, ids[0, 1:, None]).squeeze(1).tolist()
    finally:
        control.unwrap()


def test_repeng_vector_gives_repeng_logprobs(server, client, reference, repeng_vector):
    model, tokenizer = reference
    vector, _ = repeng_vector
    for scale in (2.0, -3.0):
        got = echo_logprobs(client, [{"vector": "rp", "scale": scale}])
        expected = repeng_logprobs(model, tokenizer, vector, scale)
        np.testing.assert_allclose(got, expected, atol=2e-4)
    assert not np.allclose(echo_logprobs(client), expected, atol=1e-2)


def test_greedy_generation_equals_repeng(client, reference, repeng_vector):
    model, tokenizer = reference
    vector, _ = repeng_vector
    control = ControlModel(model, list(vector.directions))
    control.set_control(vector, 4.0)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    try:
        out = control.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    finally:
        control.unwrap()
    expected = tokenizer.decode(out[0, ids.shape[1]:])
    got = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                    extra_body={"steering": [{"vector": "rp", "scale": 4.0}],
                                                "ignore_eos": True})
    assert got.choices[0].text == expected


def test_extraction_equals_repeng_read_representations(server, reference):
    model, tokenizer = reference
    body = {"name": "happy", "model": "tiny", "method": "pca_diff", "layers": [0],
            "positive": [p.positive for p in PAIRS], "negative": [p.negative for p in PAIRS]}
    response = post(server, "/v1/steering/vectors", body)
    assert response.status_code == 200, response.text
    card = response.json()
    assert card["layers"] == [0] and card["method"] == "pca_diff" and card["model"] == "tiny"
    assert (server.vectors_dir / "happy.safetensors").exists()
    expected = read_representations(model, tokenizer, PAIRS, hidden_layers=[0])[0]
    exported = httpx.get(f"{server.base_url}/v1/steering/vectors/happy?format=safetensors",
                         headers=server.headers(), timeout=30)
    assert exported.status_code == 200
    got = load(exported.content)["direction.0"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("method", ["mean_diff", "pca_center"])
def test_extraction_methods_and_delete(server, client, method):
    name = f"v-{method}"
    body = {"name": name, "model": "tiny", "method": method,
            "positive": [p.positive for p in PAIRS], "negative": [p.negative for p in PAIRS]}
    response = post(server, "/v1/steering/vectors", body)
    assert response.status_code == 200, response.text
    assert response.json()["layers"] == [1]  # repeng's default: every block but the first
    listed = httpx.get(f"{server.base_url}/v1/steering/vectors", headers=server.headers()).json()
    assert name in [v["id"] for v in listed["data"]]
    steered = echo_logprobs(client, [{"vector": name, "scale": 3.0}])
    assert not np.allclose(steered, echo_logprobs(client), atol=1e-3)
    gone = httpx.delete(f"{server.base_url}/v1/steering/vectors/{name}", headers=server.headers())
    assert gone.json() == {"id": name, "object": "steering_vector", "deleted": True}
    assert not (server.vectors_dir / f"{name}.safetensors").exists()
    missing = post(server, "/v1/completions", {"model": "tiny", "prompt": "Hi", "steering": [
        {"vector": name}]})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "steering.0.vector"


def test_gguf_export_reads_back_in_repeng(server, repeng_vector, tmp_path):
    response = httpx.get(f"{server.base_url}/v1/steering/vectors/rp?format=gguf",
                         headers=server.headers(), timeout=30)
    assert response.status_code == 200
    path = tmp_path / "rp.gguf"
    path.write_bytes(response.content)
    back = ControlVector.import_gguf(path)
    vector, _ = repeng_vector
    assert sorted(back.directions) == sorted(vector.directions)
    for layer, direction in vector.directions.items():
        np.testing.assert_array_equal(back.directions[layer], direction)
    reader = gguf.GGUFReader(path)
    assert bytes(reader.get_field("general.architecture").parts[-1]) == b"controlvector"


def test_inline_values_stream_and_mixed_items(client, repeng_vector):
    vector, _ = repeng_vector
    layer = next(iter(vector.directions))
    inline = [{"values": vector.directions[layer].tolist(), "layers": [layer], "scale": 2.0}]
    named = [{"vector": "rp", "scale": 2.0}]
    assert echo_logprobs(client, inline) == pytest.approx(echo_logprobs(client, named), abs=1e-5)
    mixed = [{"vector": "rp", "scale": 1.0, "apply_to": "generation"},
             {"values": [0.5] * 64, "layers": {"start": 0, "end": 1}, "mode": "clamp",
              "scale": 0.3, "normalize": True},
             {"values": [1.0] * 64, "target": "heads", "heads": [[0, 1], [1, 3]], "scale": 2.0}]
    body = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                extra_body={"steering": mixed, "ignore_eos": True})
    whole = client.completions.create(**body).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**body, stream=True)
                       if c.choices)
    assert streamed == whole
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    assert whole != plain


BAD_ITEMS = [
    ([{"vector": "nope"}], 404, "steering.0.vector"),
    ([{"vector": "rp", "layers": [7]}], 400, "steering.0.layers"),
    ([{"vector": "rp", "layers": {"start": 1, "end": 0}}], 400, "steering.0.layers"),
    ([{"vector": "rp", "layers": [0]}], 400, "steering.0.layers"),  # rp has no layer 0
    ([{"values": [1.0] * 63, "layers": [0]}], 400, "steering.0.values"),
    ([{"values": [1.0] * 64}], 400, "steering.0.layers"),
    ([{"values": [[1.0] * 64] * 2, "layers": [1]}], 400, "steering.0.values"),
    ([{"vector": "rp", "values": [1.0] * 64}], 400, "steering.0.vector"),
    ([{}], 400, "steering.0.vector"),
    ([{"vector": "narrow"}], 400, "steering.0.vector"),  # extracted on a smaller model
    ([{"vector": "rp", "mode": "scale"}], 400, "steering.0.mode"),
    ([{"vector": "rp", "mode": "ablate", "scale": 2.0}], 400, "steering.0.scale"),
    ([{"vector": "rp", "colour": 1}], 400, "steering.0.colour"),
    ([{"values": [1.0] * 64, "target": "heads", "heads": [[0, 4]]}], 400, "steering.0.heads"),
    ([{"values": [1.0] * 64, "target": "heads"}], 400, "steering.0.heads"),
    ([{"values": [1.0] * 64, "target": "heads", "heads": [[0, 0]], "mode": "ablate"}], 400,
     "steering.0.mode"),
    ([{"vector": "rp", "heads": [[0, 0]]}], 400, "steering.0.heads"),
    ([{"vector": "rp"}] * 9, 400, "steering"),
    ([], 400, "steering"),
]


@pytest.mark.parametrize(("steering", "status", "param"), BAD_ITEMS)
def test_bad_steering_is_refused(server, steering, status, param):
    response = post(server, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "steering": steering})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("raw", [
    '{"model": "tiny", "prompt": "Hi", "steering": [{"vector": "rp", "scale": NaN}]}',
    '{"model": "tiny", "prompt": "Hi", "steering": [{"values": [Infinity], "layers": [1]}]}',
])
def test_non_finite_numbers_are_refused(server, raw):
    response = post(server, "/v1/completions", raw)
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith("steering.0.")


BAD_EXTRACTIONS = [
    ({"negative": ["only one"]}, 400, "negative"),
    ({"name": "rp"}, 400, "name"),
    ({"name": "../escape"}, 400, "name"),
    ({"model": "nope"}, 404, "model"),
    ({"layers": [9]}, 400, "layers"),
    ({"method": "umap"}, 400, "method"),
    ({"positive": ["a"], "negative": ["b"]}, 400, "positive"),  # PCA needs 2 pairs
]


@pytest.mark.parametrize(("change", "status", "param"), BAD_EXTRACTIONS)
def test_bad_extraction_is_refused(server, change, status, param):
    body = {"name": "fresh", "model": "tiny", "positive": ["a happy day", "joy"],
            "negative": ["a sad day", "gloom"], **change}
    response = post(server, "/v1/steering/vectors", body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_vector_routes_and_health(server):
    url = f"{server.base_url}/v1/steering/vectors/nope"
    assert httpx.get(url, headers=server.headers()).status_code == 404
    assert httpx.delete(url, headers=server.headers()).status_code == 404
    assert httpx.get(f"{server.base_url}/v1/steering/vectors").status_code == 401
    fmt = httpx.get(f"{server.base_url}/v1/steering/vectors/rp?format=pt",
                    headers=server.headers())
    assert fmt.status_code == 400 and fmt.json()["error"]["param"] == "format"
    assert httpx.get(f"{server.base_url}/health").json()["status"] == "ok"
