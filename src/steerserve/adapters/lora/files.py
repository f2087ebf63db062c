"""PEFT LoRA adapters on disk: confined paths, safetensors only, strict validation.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` as written by
`PeftModel.save_pretrained`. Everything in it is treated as untrusted input: pickles are never
loaded, every config field that changes what the adapter computes is either honoured or refused
(never ignored), and every tensor must fit an nn.Linear of the base model. The base model is
only read, never wrapped or modified.

target_modules follows peft: a list selects modules whose path equals an entry or ends with
".entry"; a string is a regular expression that must fullmatch the module path, except that a
plain dotted name ("q_proj") is treated like a one-entry list and "all-linear" selects every
Linear but the output layer. Regexes are screened first (length, no repetition of a repetition
or of an alternation, at most four repetitions) because a crafted pattern could otherwise
backtrack for hours. layers_to_transform / layers_pattern are honoured as peft does (layer
patterns are taken literally, not as regexes); rank_pattern / alpha_pattern are refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from steerserve.adapters.errors import AdapterError
from steerserve.adapters.lora.paths import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    resolve_adapter_path,  # noqa: F401 (re-exported for server/routes/lora.py)
)
from steerserve.adapters.lora.targets import _BaseLayers, _module_selector

PICKLE_FILE = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20

# Fields whose truthy value changes the computation (or the base weights); the plain
# `scaling * B @ A` we apply would be silently wrong, so they are refused.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not implemented",
    "fan_in_fan_out": "fan_in_fan_out (GPT-2 Conv1D layout) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "lora_bias": "a bias on lora_B (lora_bias) is not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
}
# Initialisations that leave the base weights as they are (pissa, olora, corda, loftq and
# lora_ga rewrite them, so such an adapter only fits a modified base model).
_BASE_PRESERVING_INITS = {True, False, "gaussian", "eva", "orthogonal", "mica"}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_WEIGHT_KEY = re.compile(r"base_model\.model\.(?P<module>.+?)\.lora_(?P<side>[AB])"
                         r"(?:\.[^.]+)?\.weight")  # optional adapter name: .lora_A.default.weight


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    path: Path
    rank: int
    alpha: float
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    target_modules: tuple[str, ...]  # short names with weights, e.g. ("q_proj", "v_proj")
    # module path -> (A (r, in), B (out, r)), contiguous, in the requested dtype
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(repr=False, compare=False)


# ---- loading ------------------------------------------------------------------------------


def load_lora_adapter(name: str, path: Path, base_model: nn.Module | Mapping[str, nn.Linear],
                      max_rank: int, dtype: torch.dtype = torch.float32, *,
                      param: str | None = "lora_path") -> LoraAdapter:
    """Read and validate the adapter in `path` against `base_model`: a module (its Linear
    layers by `named_modules()` path) or a ready mapping path -> nn.Linear (e.g. the layers a
    LoRA bank can serve, which stay reachable after the bank wraps them)."""
    try:
        return _load(name, path, _linear_layers(base_model), max_rank, dtype)
    except AdapterError as err:
        err.param = err.param or param
        raise


def _linear_layers(base_model: nn.Module | Mapping[str, nn.Linear]) -> _BaseLayers:
    if not isinstance(base_model, nn.Module):
        return _BaseLayers(dict(base_model), frozenset(), None)
    modules = dict(base_model.named_modules())
    linears = {k: m for k, m in modules.items() if isinstance(m, nn.Linear)}
    get_output = getattr(base_model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    output_name = next((k for k, m in linears.items() if m is output), None)
    return _BaseLayers(linears, frozenset(modules) - set(linears), output_name)


def _load(name: str, path: Path, base: _BaseLayers, max_rank: int,
          dtype: torch.dtype) -> LoraAdapter:
    config = _read_config(path)
    rank, alpha, scaling = _rank_alpha_scaling(config, max_rank)
    _refuse_unsupported(config)
    selects = _module_selector(config, base)
    weights = _read_weights(_weights_file(path), rank, base.linears, dtype)
    for module in weights:
        if not selects(module):
            raise AdapterError(f"adapter has weights for '{module}', which its target_modules "
                               "/ layers_to_transform do not select")
    short_names = tuple(sorted({module.rsplit(".", 1)[-1] for module in weights}))
    return LoraAdapter(name, path, rank, alpha, scaling, short_names, weights)


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise AdapterError(f"the adapter directory has no {CONFIG_FILE}")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    return config


def _rank_alpha_scaling(config: dict[str, Any], max_rank: int) -> tuple[int, float, float]:
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"peft_type must be 'LORA', got {config.get('peft_type')!r}")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise AdapterError(f"rank r={rank} exceeds this server's max LoRA rank {max_rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha must be a finite number, got {alpha!r}")
    use_rslora = config.get("use_rslora") or False
    if not isinstance(use_rslora, bool):
        raise AdapterError(f"use_rslora must be a boolean, got {use_rslora!r}")
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    return rank, float(alpha), scaling


def _refuse_unsupported(config: dict[str, Any]) -> None:
    for key, reason in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{reason} (adapter_config.json has {key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"bias={config['bias']!r} is not supported (only 'none')")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool | str) or init not in _BASE_PRESERVING_INITS:
        raise AdapterError(f"init_lora_weights={init!r} rewrites the base weights; convert the "
                           "adapter (peft path_initial_model_for_weight_conversion) first")


# ---- weights ---------------------------------------------------------------------------------


def _weights_file(directory: Path) -> Path:
    file = directory / WEIGHTS_FILE
    if file.is_file():
        return file
    if (directory / PICKLE_FILE).exists():
        raise AdapterError(f"the adapter has only {PICKLE_FILE}, a pickle: pickle files are "
                           f"never loaded; re-save it as {WEIGHTS_FILE} (safe_serialization)")
    raise AdapterError(f"the adapter directory has no {WEIGHTS_FILE}")


def _read_weights(file: Path, rank: int, linears: dict[str, nn.Linear],
                  dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Check names, dtypes and shapes from the header before reading any tensor data."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            pairs = _pair_keys(list(f.keys()))
            for module, (key_a, key_b) in pairs.items():
                _check_pair(module, f.get_slice(key_a), f.get_slice(key_b), rank, linears)
            return {module: (_tensor(f, key_a, dtype), _tensor(f, key_b, dtype))
                    for module, (key_a, key_b) in pairs.items()}
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{WEIGHTS_FILE} cannot be read as safetensors: {err}") from err


def _pair_keys(keys: list[str]) -> dict[str, tuple[str, str]]:
    sides: dict[str, dict[str, str]] = {}
    for key in keys:
        match = _WEIGHT_KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"unexpected tensor '{key}' in {WEIGHTS_FILE} (only "
                               "lora_A / lora_B weights of Linear layers are supported)")
        side = sides.setdefault(match["module"], {})
        if match["side"] in side:
            raise AdapterError(f"module '{match['module']}' has two lora_{match['side']} tensors")
        side[match["side"]] = key
    if not sides:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA weights")
    for module, side in sides.items():
        if len(side) != 2:
            raise AdapterError(f"module '{module}' has lora_{''.join(side)} without its pair")
    return {module: (side["A"], side["B"]) for module, side in sides.items()}


def _check_pair(module: str, a: Any, b: Any, rank: int, linears: dict[str, nn.Linear]) -> None:
    linear = linears.get(module)
    if linear is None:
        raise AdapterError(f"module '{module}' is not a Linear layer of the base model")
    expected = {"A": [rank, linear.in_features], "B": [linear.out_features, rank]}
    for side, tensor in (("A", a), ("B", b)):
        if tensor.get_dtype() not in _FLOAT_DTYPES:
            raise AdapterError(f"lora_{side} of '{module}' has dtype {tensor.get_dtype()}, "
                               "not a float type")
        if list(tensor.get_shape()) != expected[side]:
            raise AdapterError(f"lora_{side} of '{module}' has shape {tensor.get_shape()}, "
                               f"expected {expected[side]} (r={rank})")


def _tensor(f: Any, key: str, dtype: torch.dtype) -> torch.Tensor:
    # Checked after the cast: values beyond the range of `dtype` become inf there.
    tensor = f.get_tensor(key).to(dtype).contiguous()
    if not torch.isfinite(tensor).all():
        raise AdapterError(f"'{key}' holds non-finite values (NaN or inf) in {dtype}")
    return tensor
