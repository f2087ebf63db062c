"""The architectures our own forward (decoding/model/fused.py) serves, by `model_type`, and
what each changes in the Llama layer that its Hugging Face modules do not say themselves.

Everything a module does say is read from it: the attention scale (`self_attn.scaling`, so
Gemma's `query_pre_attn_scalar` holds), attention-logit soft-capping, the MLP activation,
per-head query/key norms, which rotary table a layer uses, and sliding windows (from the
config's `layer_types`, or Mistral's single `sliding_window`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Family:
    offset_norms: bool = False  # Gemma: RMSNorm scales by (1 + weight), in fp32
    sandwich_norms: bool = False  # Gemma 2/3: a norm after attention and after the MLP too


LLAMA = Family()
GEMMA = Family(offset_norms=True)
GEMMA_SANDWICH = Family(offset_norms=True, sandwich_norms=True)

FAMILIES: dict[str, Family] = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
    "gemma": GEMMA, "gemma2": GEMMA_SANDWICH, "gemma3_text": GEMMA_SANDWICH,
}


def unsupported(model: torch.nn.Module) -> str | None:
    """Why our own forward cannot run this model (None: it can)."""
    config = model.config
    if config.model_type not in FAMILIES:
        return (f"architecture '{config.model_type}' has no own forward "
                f"(those with one: {', '.join(sorted(FAMILIES))})")
    decoder = getattr(model, model.base_model_prefix)
    if not hasattr(decoder, "rotary_emb"):
        return "no rotary embedding module"
    return None


def sliding_window(config, layer: int) -> int | None:
    """How many positions back layer `layer` attends (None: all of them)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return config.sliding_window if types[layer] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)  # Mistral: the same window in every layer


def rotary_table(config, layer: int) -> str | None:
    """Which of the rotary module's tables a layer reads (Gemma 3: local or global)."""
    types = getattr(config, "layer_types", None)
    return types[layer] if types is not None else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm, step for step (fp32 statistics, then the input dtype).
    In fp32 torch's fused kernel is the same arithmetic in one op (one call 13-15 us faster,
    docs/benchmarks.md); in bf16 it rounds once where Hugging Face rounds twice."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


def offset_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: the product with (1 + weight) in fp32, then the input dtype."""
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return (hidden * (1.0 + weight.float())).to(x.dtype)


def sliding_mask(mask: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """(B, 1, T, K) mask narrowed to the keys within `window` of each query (key index =
    position, as in the slot cache). A padding query left with no key keeps its full row, so
    no row softmaxes over nothing (its output is never read)."""
    keys = torch.arange(mask.shape[-1], device=mask.device).view(1, 1, 1, -1)
    narrowed = mask & (keys > (positions - window).view(positions.shape[0], 1, -1, 1))
    return torch.where(narrowed.any(-1, keepdim=True), narrowed, mask)
