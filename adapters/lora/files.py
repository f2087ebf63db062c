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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from re import _constants as sre_constants
from re import _parser as sre_parser
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from steerserve.adapters.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
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
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_MAX_REGEX_LENGTH = 256
_MAX_REGEX_REPEATS = 4
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}


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


# ---- paths ------------------------------------------------------------------------------


def resolve_adapter_path(requested: str, root: Path | None, param: str = "lora_path") -> Path:
    """The adapter directory for `requested`, resolved (symlinks followed) and confined to
    `root`. root=None accepts only absolute paths and confines nothing: it is meant for paths
    the operator gave at start-up (--lora NAME=PATH); paths from requests must have a root.
    (Confinement is checked, not enforced at open time: whoever can write inside the root can
    still swap files afterwards, so the root must not be writable by clients.)"""
    if not requested or "\x00" in requested:
        raise AdapterError("the adapter path is empty or contains a NUL byte", param=param)
    path = Path(requested)
    if root is None and not path.is_absolute():
        raise AdapterError(f"relative adapter path '{requested}' needs an adapter root",
                           param=param)
    base = root.resolve() if root is not None else None
    resolved = _resolve(base / path if base is not None else path, requested, param)
    if base is not None:
        _ensure_inside(resolved, base, requested, param)
    if not resolved.exists():
        raise AdapterError(f"adapter directory '{requested}' not found", 404, param)
    if not resolved.is_dir():
        raise AdapterError(f"adapter path '{requested}' is not a directory", param=param)
    if base is not None:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            _ensure_inside(_resolve(resolved / name, requested, param), base, requested, param)
    return resolved


def _resolve(path: Path, requested: str, param: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # symlink loops
        raise AdapterError(f"adapter path '{requested}' cannot be resolved", param=param) from err


def _ensure_inside(path: Path, base: Path, requested: str, param: str) -> None:
    # The root's location is not echoed back: clients need not learn the server's layout.
    if not path.is_relative_to(base):
        raise AdapterError(f"adapter path '{requested}' leads outside the adapter root "
                           "('..', an absolute path or a symlink)", param=param)


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


@dataclass(frozen=True)
class _BaseLayers:
    linears: dict[str, nn.Linear]
    others: frozenset[str]  # non-Linear module paths, only to explain a bad target
    output: str | None  # the output layer, left out of "all-linear"


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


# ---- which modules the config selects --------------------------------------------------------


def _module_selector(config: dict[str, Any], base: _BaseLayers) -> Callable[[str], bool]:
    """peft's target matching: target_modules, minus exclude_modules, within the layers."""
    targets = config.get("target_modules")
    if not targets:
        raise AdapterError("target_modules is missing or empty")
    target = _target_matcher(targets, "target_modules", base)
    _check_targets_exist(targets, target, base)
    excluded = config.get("exclude_modules")
    exclude = _target_matcher(excluded, "exclude_modules", base) if excluded else None
    in_layers = _layer_filter(config, targets)
    return lambda path: target(path) and in_layers(path) and not (exclude and exclude(path))


def _target_matcher(spec: object, key: str, base: _BaseLayers) -> Callable[[str], bool]:
    if isinstance(spec, str) and spec.lower() == "all-linear":
        return lambda path: path in base.linears and path != base.output
    if isinstance(spec, str) and _PLAIN_NAME.fullmatch(spec):
        spec = [spec]
    if isinstance(spec, str):
        pattern = _screened_regex(spec, key)
        return lambda path: pattern.fullmatch(path) is not None
    if not isinstance(spec, list) or not all(isinstance(n, str) and n for n in spec):
        raise AdapterError(f"{key} must be a list of module names or a string")
    names = frozenset(spec)
    return lambda path: path in names or any(path.endswith("." + n) for n in names)


def _check_targets_exist(spec: object, target: Callable[[str], bool], base: _BaseLayers) -> None:
    """Each target must name Linear layers of the base model, and only Linear layers."""
    entries = spec if isinstance(spec, list) else [spec]
    for entry in entries:
        matcher = target if isinstance(spec, str) else _target_matcher([entry], "", base)
        non_linear = sorted(p for p in base.others if p and matcher(p))
        if non_linear:
            raise AdapterError(f"target_modules entry {entry!r} selects '{non_linear[0]}', "
                               "which is not a Linear layer (only Linear layers are supported)")
        if not any(matcher(p) for p in base.linears):
            raise AdapterError(f"target module {entry!r} is not found among the base model's "
                               "Linear layers")


def _screened_regex(pattern: str, key: str) -> re.Pattern[str]:
    """Compile a target regex, refusing shapes that can backtrack exponentially."""
    if len(pattern) > _MAX_REGEX_LENGTH:
        raise AdapterError(f"{key} regex is longer than {_MAX_REGEX_LENGTH} characters")
    try:
        risks = list(_repetition_risks(sre_parser.parse(pattern), inside=False))
    except re.error as err:
        raise AdapterError(f"{key} is not a valid regular expression: {err}") from err
    if any(risks) or len(risks) > _MAX_REGEX_REPEATS:
        raise AdapterError(f"{key} regex {pattern!r} is too complex (nested repetition, a "
                           f"repeated alternation or more than {_MAX_REGEX_REPEATS} repetitions)")
    return re.compile(pattern)


def _repetition_risks(items: Any, inside: bool) -> Iterator[bool]:
    """One item per repetition in a parsed regex: True when it sits inside another repetition;
    also True for an alternation inside a repetition."""
    for op, arg in items:
        repeat = op in _REPEATS and arg[1] > 1
        if repeat or (inside and op is sre_constants.BRANCH):
            yield inside
        for child in _subpatterns(arg):
            yield from _repetition_risks(child, inside or repeat)


def _subpatterns(arg: Any) -> Iterator[Any]:
    if isinstance(arg, sre_parser.SubPattern):
        yield arg
    elif isinstance(arg, list | tuple):
        for item in arg:
            yield from _subpatterns(item)


def _layer_filter(config: dict[str, Any], targets: object) -> Callable[[str], bool]:
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return lambda _: True
    if isinstance(targets, str):  # peft refuses this combination too
        raise AdapterError("layers_to_transform cannot be combined with a string target_modules")
    indexes = [layers] if isinstance(layers, int) else layers
    if not isinstance(indexes, list) or not all(_is_int(i) for i in indexes):
        raise AdapterError(f"layers_to_transform must be an int or a list of ints, got {layers!r}")
    regexes = _layer_index_regexes(config.get("layers_pattern"))
    return lambda path: _layer_index(path, regexes) in indexes


def _layer_index_regexes(patterns: object) -> list[re.Pattern[str]]:
    if not patterns:  # peft: the first number that follows a dotted name
        return [re.compile(r".*?\.[^.]*\.(\d+)\.")]
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AdapterError(f"layers_pattern must be a string or a list, got {patterns!r}")
    return [re.compile(rf"(?:^|.*?\.){re.escape(p)}\.(\d+)\.") for p in patterns]


def _layer_index(path: str, regexes: list[re.Pattern[str]]) -> int | None:
    for regex in regexes:
        match = regex.match(path)
        if match:
            return int(match.group(1))
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
