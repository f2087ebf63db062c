"""A router file: the clusters' centroids and the expert adapters they belong to.

`router.safetensors` holds `centroids` (K, D): unit vectors of the clusters' gradient features
(D: the feature adapter's LoRA B entries in `feature_layer`), and `hidden_centroids` (K, H):
unit mean final hidden states of each cluster's prompts (the cheaper routing). Its metadata
has "format" = FORMAT and "config" = RouterConfig as JSON. Beside it, `feature-adapter/` is
the LoRA whose gradient is the feature (a peft directory). Nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from steerserve.adapters.tagged_files import read_tagged

FORMAT = "steerserve.router"
FILE = "router.safetensors"
FEATURE_ADAPTER = "feature-adapter"
MAX_EXPERTS = 8
MAX_FEATURES = 1 << 22


@dataclass(frozen=True)
class RouterConfig:
    experts: tuple[str, ...]  # adapter names, one per centroid row
    feature_layer: int  # the block whose LoRA B gradients are the feature
    temperature: float = 0.1  # softmax temperature over cosine similarities
    model: str | None = None  # the model it was trained on (informational)

    def __post_init__(self) -> None:
        object.__setattr__(self, "experts", tuple(self.experts))
        if not 1 <= len(self.experts) <= MAX_EXPERTS or not all(
                isinstance(e, str) and e for e in self.experts):
            raise ValueError(f"experts must name 1..{MAX_EXPERTS} adapters")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError("experts must differ")
        if not isinstance(self.feature_layer, int) or self.feature_layer < 0:
            raise ValueError("feature_layer must be a block index")
        if not isinstance(self.temperature, int | float) or not 0 < self.temperature <= 100:
            raise ValueError("temperature must lie in (0, 100]")


@dataclass(frozen=True)
class Router:
    config: RouterConfig
    centroids: torch.Tensor  # (K, D) unit rows
    hidden_centroids: torch.Tensor  # (K, H) unit rows
    feature_adapter: Path

    def route(self, feature: torch.Tensor, by_hidden: bool, top_k: int
              ) -> list[tuple[str, float]]:
        """(expert, weight) of the top_k most similar clusters, weights a softmax of their
        cosine similarities over the temperature, most similar first."""
        centre = self.hidden_centroids if by_hidden else self.centroids
        feature = feature.detach().float().cpu()
        unit = feature / feature.norm().clamp_min(1e-12)
        values, index = (centre @ unit).topk(top_k)
        weights = (values / self.config.temperature).softmax(-1)
        return [(self.config.experts[i], w) for i, w in zip(index.tolist(), weights.tolist(),
                                                            strict=True)]


def save_router(path: Path, centroids: torch.Tensor, hidden_centroids: torch.Tensor,
                config: RouterConfig) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"centroids": centroids.float().contiguous().clone(),
               "hidden_centroids": hidden_centroids.float().contiguous().clone()}, str(path),
              metadata={"format": FORMAT, "config": json.dumps(asdict(config))})


def load_router(directory: Path, hidden_size: int, num_layers: int) -> Router:
    """Read and check a router directory (ValueError naming the problem)."""
    path = directory / FILE
    metadata, tensors = read_tagged(path, FORMAT, "router")
    if not (directory / FEATURE_ADAPTER).is_dir():
        raise ValueError(f"router '{directory}': no {FEATURE_ADAPTER}/ directory")
    try:
        config = RouterConfig(**json.loads(metadata.get("config", "")))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"router '{path}': bad config: {exc}") from exc
    if config.feature_layer >= num_layers:
        raise ValueError(f"router '{path}': feature_layer {config.feature_layer} is past the "
                         f"model's {num_layers} layers")
    k = len(config.experts)
    _check(path, tensors, "centroids", k, None)
    _check(path, tensors, "hidden_centroids", k, hidden_size)
    if set(tensors) != {"centroids", "hidden_centroids"}:
        raise ValueError(f"router '{path}': unexpected tensors {sorted(tensors)}")
    return Router(config, tensors["centroids"].float(), tensors["hidden_centroids"].float(),
                  directory / FEATURE_ADAPTER)


def _check(path: Path, tensors: dict[str, torch.Tensor], name: str, rows: int,
           width: int | None) -> None:
    t = tensors.get(name)
    if t is None or t.dim() != 2 or t.shape[0] != rows or not 0 < t.shape[1] <= MAX_FEATURES:
        raise ValueError(f"router '{path}': '{name}' must be ({rows}, D), one row per expert")
    if width is not None and t.shape[1] != width:
        raise ValueError(f"router '{path}': '{name}' is {t.shape[1]} wide, the model's hidden "
                         f"states {width}")
    if not t.is_floating_point() or not torch.isfinite(t).all():
        raise ValueError(f"router '{path}': '{name}' is not finite floating point")
