"""Sparse-autoencoder feature steering in the engine: SAELens files load (and bad ones are
refused), the per-request feature edit equals a SAELens-style reference hook on an untouched
model copy (encode, edit the feature, add the decoded difference back), and a batch of mixed
rows equals each row alone."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from steerserve.adapters.errors import AdapterError
from steerserve.adapters.sae.files import hook_layer, load_sae
from steerserve.adapters.steering.spec import ApplyTo, FeatureEdit, SteeringSpec
from steerserve.decoding.model.loader import from_pretrained_objects
from tests.engine_helpers import Collector, hf_greedy, run_to_completion
from tests.support import make_engine
from tests.test_steering import GREEDY, PROMPTS, generate, residual
from tests.tiny_models import tiny_llama

D_IN, D_SAE = 64, 96


def random_sae_tensors(seed: int, jumprelu: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(D_IN, D_SAE, generator=gen) * 0.3,
               "b_enc": torch.randn(D_SAE, generator=gen) * 0.2,
               "W_dec": torch.randn(D_SAE, D_IN, generator=gen) * 0.5,
               "b_dec": torch.randn(D_IN, generator=gen) * 0.1}
    if jumprelu:
        tensors["threshold"] = torch.rand(D_SAE, generator=gen) * 0.5
    return tensors


def write_saelens(directory, tensors, hook: str | None, architecture: str = "standard",
                  **overrides) -> None:
    """The files SAELens 6's `SAE.save_model` writes: its state dict as safetensors, and
    `cfg.to_dict()` (the config's fields, `metadata`, `architecture`) as cfg.json."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(directory / "sae_weights.safetensors"))
    config = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
              "apply_b_dec_to_input": True, "normalize_activations": "none",
              "reshape_activations": "none",
              "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                           "model_name": "tiny", "hook_name": hook, "hook_head_index": None,
                           "prepend_bos": True, "dataset_path": None, "context_size": 128},
              "architecture": architecture, **overrides}
    (directory / "cfg.json").write_text(json.dumps(config))


def saelens_edit(tensors, features: dict[int, tuple[str, float]], jumprelu: bool = False):
    """The edit as SAELens's hooked SAE does it, written here from its definitions: encode the
    whole residual, change the chosen features (add: `scale` more of the decoder direction,
    i.e. x + scale * W_dec[j]; clamp: set f_j), decode, keep the reconstruction error."""
    def edit(x):
        pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
        f = torch.relu(pre)
        if jumprelu:
            f = f * (pre > tensors["threshold"])
        edited = f.clone()
        for j, (mode, value) in features.items():
            edited[..., j] = value if mode == "clamp" else edited[..., j] + value
        return x + (edited - f) @ tensors["W_dec"]
    return edit


@pytest.fixture(scope="module")
def model_pair(tokenizer):
    model = tiny_llama(len(tokenizer), seed=3)
    return from_pretrained_objects(model, tokenizer, "tiny-sae"), copy.deepcopy(model)


def feature(sae, j: int, value: float, clamp: bool = False,
            apply_to: ApplyTo = ApplyTo.BOTH) -> FeatureEdit:
    return FeatureEdit(sae.layer, (sae.name, j), sae.encoders[j], float(sae.enc_bias[j]),
                       float(sae.threshold[j]), sae.decoders[j], clamp, value, apply_to)


def hooked(reference, layer: int, edit):
    model = copy.deepcopy(reference)
    model.model.layers[layer].register_forward_hook(
        lambda m, a, out: (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out))
    return model


def test_saelens_layouts_load(tmp_path):
    write_saelens(tmp_path / "a", random_sae_tensors(1), "blocks.1.hook_resid_post")
    sae = load_sae("a", tmp_path / "a")
    assert (sae.layer, sae.d_in, sae.d_sae, sae.architecture) == (1, D_IN, D_SAE, "standard")
    # SAELens 5 kept hook_name and hook_layer at the top level
    write_saelens(tmp_path / "b", random_sae_tensors(1), None, hook_name="blocks.1.hook_resid_pre",
                  hook_layer=1)
    assert load_sae("b", tmp_path / "b").layer == 0
    assert [hook_layer(h) for h in ("blocks.3.hook_resid_post", "blocks.3.hook_resid_pre")] == \
        [3, 2]


def test_encode_equals_saelens_definition(tmp_path):
    tensors = random_sae_tensors(2, jumprelu=True)
    write_saelens(tmp_path / "j", tensors, "blocks.0.hook_resid_post", "jumprelu")
    sae = load_sae("j", tmp_path / "j")
    x = torch.randn(5, D_IN)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    expected = torch.relu(pre) * (pre > tensors["threshold"])
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(expected), expected @ tensors["W_dec"] +
                               tensors["b_dec"])


@pytest.mark.parametrize(("change", "message"), [
    ({"hook": "blocks.0.hook_mlp_out"}, "only the residual stream"),
    ({"hook": "blocks.0.hook_resid_pre"}, "embedding output"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    ({"architecture": "gated"}, "not served"),
    ({"d_sae": D_SAE + 1}, "shape"),
    ({"drop": "b_dec"}, "lacks b_dec"),
    ({"nan": "W_dec"}, "non-finite"),
])
def test_bad_sae_files_are_refused_with_the_reason(tmp_path, change, message):
    tensors = random_sae_tensors(3)
    if "drop" in change:
        del tensors[change["drop"]]
    if "nan" in change:
        tensors[change["nan"]][0, 0] = float("nan")
    overrides = {k: v for k, v in change.items() if k in ("normalize_activations", "d_sae",
                                                          "architecture")}
    write_saelens(tmp_path / "x", tensors, change.get("hook", "blocks.0.hook_resid_post"),
                  **overrides)
    with pytest.raises(AdapterError, match=message):
        load_sae("x", tmp_path / "x")


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.0.hook_resid_post"}))
    (tmp_path / "p" / "sae_weights.pt").write_bytes(b"never unpickled")
    with pytest.raises(AdapterError, match="no sae_weights.safetensors"):
        load_sae("p", tmp_path / "p")


@pytest.mark.parametrize("forward", ["fused", "hf"])
@pytest.mark.parametrize("jumprelu", [False, True])
def test_feature_edits_equal_the_saelens_reference(tmp_path, model_pair, forward, jumprelu):
    loaded, reference = model_pair
    tensors = random_sae_tensors(4, jumprelu)
    write_saelens(tmp_path / "s", tensors, "blocks.0.hook_resid_post",
                  "jumprelu" if jumprelu else "standard")
    sae = load_sae("s", tmp_path / "s")
    engine = make_engine(loaded, forward=forward)
    cases = [{5: ("add", 6.0)}, {7: ("clamp", 4.0)}, {5: ("add", -3.0), 11: ("clamp", 0.0),
                                                       12: ("clamp", 5.0)}]
    for chosen in cases:
        spec = SteeringSpec((), tuple(feature(sae, j, v, mode == "clamp")
                                      for j, (mode, v) in chosen.items()))
        expected = hf_greedy(hooked(reference, 0, saelens_edit(tensors, chosen, jumprelu)),
                             PROMPTS[0], GREEDY.max_tokens)
        assert generate(engine, PROMPTS[0], spec) == expected
    assert expected != hf_greedy(reference, PROMPTS[0], GREEDY.max_tokens)


def test_mixed_batch_of_features_vectors_and_plain_rows_equals_each_alone(tmp_path, model_pair):
    loaded, _ = model_pair
    write_saelens(tmp_path / "s0", random_sae_tensors(5), "blocks.0.hook_resid_post")
    write_saelens(tmp_path / "s1", random_sae_tensors(6), "blocks.1.hook_resid_post")
    s0, s1 = load_sae("s0", tmp_path / "s0"), load_sae("s1", tmp_path / "s1")
    vector = torch.randn(D_IN, generator=torch.Generator().manual_seed(9))
    specs = [
        SteeringSpec((), (feature(s0, 3, 5.0),)),
        None,
        SteeringSpec((residual(0, vector, 2.0),), (feature(s0, 3, 1.0, clamp=True),
                                                    feature(s1, 40, -4.0))),
        SteeringSpec((), (feature(s1, 2, 6.0, apply_to=ApplyTo.GENERATION),
                          feature(s0, 8, 3.0, apply_to=ApplyTo.PROMPT))),
    ]
    engine = make_engine(loaded)
    alone = [generate(engine, p, s) for p, s in zip(PROMPTS, specs, strict=True)]
    assert len({tuple(tokens) for tokens in alone}) == 4
    collector = Collector()
    collector.submit(engine, "a", PROMPTS[0], GREEDY, steering=specs[0])
    collector.submit(engine, "b", PROMPTS[1], GREEDY, steering=specs[1])
    engine.step()
    collector.submit(engine, "c", PROMPTS[2], GREEDY, steering=specs[2])
    collector.submit(engine, "d", PROMPTS[3], GREEDY, steering=specs[3])
    run_to_completion(engine)
    assert [collector.tokens(x) for x in "abcd"] == alone
