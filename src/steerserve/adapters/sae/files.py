"""Sparse autoencoders in SAELens's on-disk layout: a directory with `cfg.json` and
`sae_weights.safetensors` (W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec, and a
`threshold` for JumpReLU). Safetensors only: nothing is unpickled.

The hook point comes from `metadata.hook_name` (SAELens 6) or a top-level `hook_name` (older
releases). `blocks.L.hook_resid_post` is the output of block L, and `blocks.L.hook_resid_pre`
is the input of block L, i.e. the output of block L - 1. Other hook points, activation
normalisations and reshapes are refused with the reason, rather than run differently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from steerserve.adapters.errors import AdapterError
from steerserve.adapters.sae.autoencoder import ARCHITECTURES, SparseAutoencoder

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
MAX_CFG_BYTES = 1 << 20
_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")


def hook_layer(hook_name: str) -> int:
    """The steerserve layer (a block's output) a residual-stream hook point reads."""
    match = _HOOK.fullmatch(hook_name or "")
    if match is None:
        raise AdapterError(f"hook point '{hook_name}' is not served: only the residual stream "
                           "(blocks.L.hook_resid_post or blocks.L.hook_resid_pre) is")
    layer = int(match.group(1))
    if match.group(2) == "post":
        return layer
    if layer == 0:
        raise AdapterError("blocks.0.hook_resid_pre is the embedding output, which is not "
                           "steered; use an SAE on a block's output")
    return layer - 1


def _config(directory: Path) -> dict:
    path = directory / CFG_FILENAME
    if not path.is_file() or path.stat().st_size > MAX_CFG_BYTES:
        raise AdapterError(f"SAE directory {directory} has no {CFG_FILENAME} (or it is too big)")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a JSON object")
    return config


def _check_supported(config: dict, architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise AdapterError(f"SAE architecture '{architecture}' is not served (served: "
                           f"{', '.join(ARCHITECTURES)})")
    unsupported = {"normalize_activations": "none", "reshape_activations": "none",
                   "rescale_acts_by_decoder_norm": False, "hook_head_index": None}
    for field, served in unsupported.items():
        value = config.get(field)
        if value is not None and value != served:
            raise AdapterError(f"SAE config {field}={config[field]!r} is not served (only "
                               f"{served!r})")


def _tensors(directory: Path, architecture: str) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILENAME
    if not path.is_file():
        raise AdapterError(f"SAE directory {directory} has no {WEIGHTS_FILENAME}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterError(f"{path}: unreadable safetensors ({exc})") from exc
    needed = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if architecture ==
                                                     "jumprelu" else [])
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise AdapterError(f"{path} lacks {', '.join(missing)}")
    return {name: tensors[name].float() for name in needed}


def _check_shapes(t: dict[str, torch.Tensor], d_in: int, d_sae: int, path: Path) -> None:
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
                "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, tensor in t.items():
        if tuple(tensor.shape) != expected[name]:
            raise AdapterError(f"{path}: {name} has shape {tuple(tensor.shape)}, cfg.json "
                               f"says {expected[name]}")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{path}: {name} has non-finite values")


def load_sae(name: str, directory: str | Path, device: torch.device | str = "cpu"
             ) -> SparseAutoencoder:
    directory = Path(directory).expanduser()
    config = _config(directory)
    architecture = str(config.get("architecture", "standard"))
    _check_supported(config, architecture)
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    hook_name = metadata.get("hook_name") or config.get("hook_name")
    layer = hook_layer(hook_name)
    try:
        d_in, d_sae = int(config["d_in"]), int(config["d_sae"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"{directory / CFG_FILENAME}: d_in and d_sae are required") from exc
    t = _tensors(directory, architecture)
    _check_shapes(t, d_in, d_sae, directory / WEIGHTS_FILENAME)
    k = None
    if architecture == "topk":
        k = int(config.get("k") or (config.get("activation_fn_kwargs") or {}).get("k") or 0)
        if not 0 < k <= d_sae:
            raise AdapterError(f"TopK SAE {directory}: k must be in 1..{d_sae}")
    bias = t["b_enc"]
    if config.get("apply_b_dec_to_input", True):
        bias = bias - t["b_dec"] @ t["W_enc"]
    # JumpReLU is relu(pre) * (pre > threshold): active only above max(threshold, 0).
    threshold = t["threshold"].clamp(min=0) if architecture == "jumprelu" else \
        torch.zeros(d_sae)
    return SparseAutoencoder(
        name=name, path=directory, hook_name=hook_name, layer=layer, architecture=architecture,
        encoders=t["W_enc"].T.contiguous().to(device), enc_bias=bias.to(device),
        threshold=threshold.to(device), decoders=t["W_dec"].contiguous().to(device),
        dec_bias=t["b_dec"].to(device), k=k,
        model_name=metadata.get("model_name") or config.get("model_name"))


def save_sae(directory: str | Path, tensors: dict[str, torch.Tensor], hook_name: str,
             model_name: str, architecture: str = "standard", extra: dict | None = None,
             dtype: torch.dtype = torch.float32) -> None:
    """Write SAELens 6's layout (what its `save_model` writes for a standard SAE)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = tensors["W_enc"].shape
    save_file({name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()},
              str(directory / WEIGHTS_FILENAME))
    config = {"d_in": int(d_in), "d_sae": int(d_sae), "dtype": str(dtype).removeprefix("torch."),
              "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
              "reshape_activations": "none", "architecture": architecture,
              "metadata": {"model_name": model_name, "hook_name": hook_name, **(extra or {})}}
    (directory / CFG_FILENAME).write_text(json.dumps(config, indent=1))
