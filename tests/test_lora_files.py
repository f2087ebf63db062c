"""PEFT LoRA adapter files: peft writes them, we load and check them against the PeftModel,
and every unsafe or unsupported adapter is refused with a clear AdapterError."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from steerserve.adapters.lora.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    LoraAdapter,
    load_lora_adapter,
    resolve_adapter_path,
)

# peft calls a transformers helper that transformers 5 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
MAX_RANK = 16
LAYERS = (0, 1)


def _save_peft(model: torch.nn.Module, directory: Path, **lora) -> torch.nn.Module:
    """A random adapter (init_lora_weights=False makes B non-zero), saved as safetensors."""
    torch.manual_seed(7)
    config = LoraConfig(init_lora_weights=False, **lora)
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    peft_model.save_pretrained(directory)
    return peft_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def plain(root, llama) -> tuple[Path, torch.nn.Module]:
    path = root / "plain"
    return path, _save_peft(llama.model, path, r=4, lora_alpha=8,
                            target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def rslora(root, llama) -> tuple[Path, torch.nn.Module]:
    path = root / "rslora"
    return path, _save_peft(llama.model, path, r=8, lora_alpha=16, use_rslora=True,
                            target_modules=["k_proj", "gate_proj", "down_proj"])


def _load(path: Path, llama, **kwargs) -> LoraAdapter:
    return load_lora_adapter("test", path, llama.model, MAX_RANK, **kwargs)


def _copy(plain: tuple[Path, torch.nn.Module], tmp_path: Path) -> Path:
    return Path(shutil.copytree(plain[0], tmp_path / "adapter"))


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


def _edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_FILE)


def _refused(call: Callable[[], object], fragment: str, status: int = 400) -> AdapterError:
    with pytest.raises(AdapterError) as caught:
        call()
    assert caught.value.status == status
    assert fragment.lower() in str(caught.value).lower(), str(caught.value)
    return caught.value


# ---- loading what peft wrote -------------------------------------------------------------


def test_loads_peft_adapter(plain, llama):
    adapter = _load(plain[0], llama)
    attn = [f"model.layers.{i}.self_attn.{p}" for i in LAYERS for p in ("q_proj", "v_proj")]
    assert set(adapter.weights) == set(attn)
    assert (adapter.rank, adapter.alpha, adapter.scaling) == (4, 8.0, 2.0)
    assert adapter.target_modules == ("q_proj", "v_proj")
    a, b = adapter.weights["model.layers.0.self_attn.v_proj"]
    assert a.shape == (4, 64) and b.shape == (32, 4)  # 2 KV heads of 16: v_proj out is 32
    assert a.is_contiguous() and b.is_contiguous() and b.abs().sum() > 0


@pytest.mark.parametrize("which, module", [
    ("plain", "model.layers.1.self_attn.v_proj"),
    ("rslora", "model.layers.0.mlp.down_proj"),
    ("rslora", "model.layers.1.self_attn.k_proj"),
])
def test_lora_delta_matches_peft(which, module, request, llama):
    path, peft_model = request.getfixturevalue(which)
    adapter = _load(path, llama)
    if which == "rslora":
        assert adapter.scaling == pytest.approx(16 / math.sqrt(8))
    base = llama.model.get_submodule(module)
    a, b = adapter.weights[module]
    x = torch.randn(3, base.in_features)
    ours = base(x) + adapter.scaling * (x @ a.T) @ b.T
    expected = peft_model.base_model.model.get_submodule(module)(x)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_base_model_untouched(plain, llama):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    _load(plain[0], llama)
    after = llama.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(llama.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_dtype_and_linear_mapping(plain, llama):
    linears = {f"model.layers.{i}.self_attn.{p}": llama.model.get_submodule(
        f"model.layers.{i}.self_attn.{p}") for i in LAYERS for p in ("q_proj", "v_proj")}
    adapter = load_lora_adapter("m", plain[0], linears, MAX_RANK, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for pair in adapter.weights.values() for t in pair)


def test_adapter_name_in_keys(plain, llama, tmp_path):
    path = _copy(plain, tmp_path)
    _edit_weights(path, lambda t: t.update(
        {k.replace(".weight", ".default.weight"): t.pop(k) for k in list(t)}))
    renamed, original = _load(path, llama), _load(plain[0], llama)
    for module, (a, b) in original.weights.items():
        assert torch.equal(renamed.weights[module][0], a)
        assert torch.equal(renamed.weights[module][1], b)


def test_regex_target_and_layers(root, llama, tmp_path, plain):
    path = _copy(plain, tmp_path)
    _edit_config(path, target_modules=r".*\.(q_proj|v_proj)")
    assert len(_load(path, llama).weights) == 4
    _edit_config(path, target_modules=r"(.*)*q_proj")
    _refused(lambda: _load(path, llama), "too complex")
    layered = root / "layer1"
    _save_peft(llama.model, layered, r=2, lora_alpha=2, target_modules=["o_proj"],
               layers_to_transform=[1])
    assert list(_load(layered, llama).weights) == ["model.layers.1.self_attn.o_proj"]
    _edit_config(layered, layers_to_transform=[0])
    _refused(lambda: _load(layered, llama), "do not select")


# ---- paths ---------------------------------------------------------------------------------


def test_paths_inside_root(plain, root):
    assert resolve_adapter_path("plain", root) == plain[0].resolve()
    assert resolve_adapter_path("x/../plain", root) == plain[0].resolve()
    assert resolve_adapter_path(str(plain[0]), root) == plain[0].resolve()
    assert resolve_adapter_path(str(plain[0]), None) == plain[0].resolve()


def test_path_escapes_refused(plain, root, tmp_path):
    outside = Path(shutil.copytree(plain[0], tmp_path / "outside"))
    error = _refused(lambda: resolve_adapter_path("../" + outside.parent.name, root), "outside")
    assert error.param == "lora_path" and str(root) not in str(error)
    _refused(lambda: resolve_adapter_path(str(outside), root), "outside")
    link = root / f"link-{tmp_path.name}"
    link.symlink_to(outside, target_is_directory=True)
    _refused(lambda: resolve_adapter_path(link.name, root, param="lora"), "outside")


def test_file_symlink_escape_refused(plain, root, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    inside = Path(shutil.copytree(plain[0], root / f"filelink-{tmp_path.name}"))
    (inside / CONFIG_FILE).unlink()
    os.symlink(outside, inside / CONFIG_FILE)
    _refused(lambda: resolve_adapter_path(inside.name, root), "outside")


def test_path_errors(plain, root):
    _refused(lambda: resolve_adapter_path("missing", root), "not found", status=404)
    _refused(lambda: resolve_adapter_path("/nonexistent/adapter", None), "not found", 404)
    _refused(lambda: resolve_adapter_path("plain", None), "needs an adapter root")
    _refused(lambda: resolve_adapter_path("pl\x00ain", root), "NUL")
    _refused(lambda: resolve_adapter_path("plain/" + CONFIG_FILE, root), "not a directory")


# ---- refused files -----------------------------------------------------------------------


def test_pickle_only_refused(plain, llama, tmp_path):
    path = _copy(plain, tmp_path)
    (path / WEIGHTS_FILE).unlink()
    (path / "adapter_model.bin").write_bytes(b"not really a pickle")
    _refused(lambda: _load(path, llama), "pickle")


def test_missing_and_malformed_config(plain, llama, tmp_path):
    path = _copy(plain, tmp_path)
    (path / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": ')
    _refused(lambda: _load(path, llama), "not valid JSON")
    (path / CONFIG_FILE).write_text("[1, 2]")
    _refused(lambda: _load(path, llama), "JSON object")
    (path / CONFIG_FILE).unlink()
    _refused(lambda: _load(path, llama), f"no {CONFIG_FILE}")


@pytest.mark.parametrize("changes, fragment", [
    ({"r": MAX_RANK + 1}, f"max LoRA rank {MAX_RANK}"),
    ({"r": "4"}, "r must be a positive integer"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"peft_type": "IA3"}, "peft_type"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 2}}, "alpha_pattern"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"target_modules": ["q_proj", "v_proj", "nonexistent_proj"]}, "nonexistent_proj"),
    ({"target_modules": ["q_proj", "v_proj", "mlp"]}, "not a Linear layer"),
    ({"target_modules": "q_proj"}, "do not select"),  # v_proj weights not targeted
])
def test_config_refused(changes, fragment, plain, llama, tmp_path):
    path = _copy(plain, tmp_path)
    _edit_config(path, **changes)
    _refused(lambda: _load(path, llama), fragment)


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.update({next(k for k in t if "lora_B" in k): torch.zeros(4, 64)}), "shape"),
    (lambda t: t[next(k for k in t if "lora_A" in k)].fill_(float("nan")), "non-finite"),
    (lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}), "unexpected"),
    (lambda t: t.pop(next(k for k in t if "lora_B" in k)), "without its pair"),
    (lambda t: t.update({k.replace("layers.1.", "layers.7."): t.pop(k) for k in list(t)}),
     "not a Linear layer of the base model"),
    (lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}), "not a float"),
])
def test_weights_refused(edit, fragment, plain, llama, tmp_path):
    path = _copy(plain, tmp_path)
    _edit_weights(path, edit)
    _refused(lambda: _load(path, llama), fragment)


def test_corrupt_safetensors_refused(plain, llama, tmp_path):
    path = _copy(plain, tmp_path)
    (path / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    error = _refused(lambda: _load(path, llama), "cannot be read")
    assert error.param == "lora_path"
