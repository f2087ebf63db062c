"""The request's `steering` items -> a SteeringSpec for the engine, every field checked.

Errors name the item's field the way validation errors do: `steering.<i>.<field>`.
"""

from __future__ import annotations

import torch

from steerserve.adapters.sae.autoencoder import SparseAutoencoder
from steerserve.adapters.steering.spec import (
    ApplyTo,
    FeatureEdit,
    ModelShape,
    SteerEdit,
    SteeringSpec,
    SteerMode,
    SteerTarget,
)
from steerserve.adapters.steering.store import VectorStore
from steerserve.adapters.steering.vectors import SteeringVector
from steerserve.server.errors import APIError
from steerserve.server.schemas.steering import LayerRange, SteeringItem
from steerserve.server.translate.features import feature_edit

_MODES = {"add": SteerMode.ADD, "ablate": SteerMode.ABLATE, "clamp": SteerMode.CLAMP}


def resolve_steering(items: list[SteeringItem] | None, vectors: VectorStore, shape: ModelShape,
                     device: torch.device, saes: dict[str, SparseAutoencoder] | None = None
                     ) -> SteeringSpec | None:
    if not items:
        return None
    edits: list[SteerEdit] = []
    features: list[FeatureEdit] = []
    for index, item in enumerate(items):
        param = f"steering.{index}"
        if item.sae is not None:
            features.append(feature_edit(item, param, saes or {}, shape, device))
        else:
            for field in ("feature", "clamp"):
                if field in item.model_fields_set:
                    raise APIError(400, f"'{field}' is for 'sae' items", f"{param}.{field}")
            edits.extend(_ItemResolver(item, param, vectors, shape, device).edits())
    return SteeringSpec(tuple(edits), tuple(features))


def layer_list(layers: list[int] | LayerRange, num_layers: int, param: str) -> list[int]:
    """Explicit layers or an inclusive range, each a decoder block of the model."""
    if isinstance(layers, LayerRange):  # bounds first: the range is expanded after them
        if layers.start > layers.end:
            raise APIError(400, f"layer range start {layers.start} is after end {layers.end}",
                           param)
        if layers.end >= num_layers:
            raise APIError(400, f"layer {layers.end} is out of range: this model has decoder "
                           f"blocks 0..{num_layers - 1}", param)
        layers = list(range(layers.start, layers.end + 1))
    if not layers:
        raise APIError(400, "layers must not be empty", param)
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise APIError(400, f"layer {layer} is out of range: this model has decoder blocks "
                           f"0..{num_layers - 1}", param)
    if len(set(layers)) != len(layers):
        raise APIError(400, "layers must not repeat", param)
    return sorted(layers)


class _ItemResolver:
    def __init__(self, item: SteeringItem, param: str, vectors: VectorStore, shape: ModelShape,
                 device: torch.device) -> None:
        self.item, self.param, self.shape, self.device = item, param, shape, device
        self.target = SteerTarget(item.target)
        self.width = shape.hidden_size if self.target == SteerTarget.RESIDUAL else \
            shape.heads_width
        self.named = self._named_vector(vectors)

    def _fail(self, field: str, message: str, status: int = 400, code: str | None = None):
        raise APIError(status, message, f"{self.param}.{field}", code)

    def _named_vector(self, vectors: VectorStore) -> SteeringVector | None:
        item = self.item
        if (item.vector is None) == (item.values is None):
            self._fail("vector", "give exactly one of 'vector' (a registered name) or 'values'")
        if item.vector is None:
            return None
        vector = vectors.get(item.vector)
        if vector is None:
            self._fail("vector", f"no steering vector named '{item.vector}'", 404,
                       "vector_not_found")
        if vector.target != self.target.value:
            self._fail("target", f"vector '{item.vector}' is for target '{vector.target}'")
        if vector.width != self.width:
            self._fail("vector", f"vector '{item.vector}' has width {vector.width}, but this "
                       f"model's {self._width_name()} is {self.width}")
        return vector

    def _width_name(self) -> str:
        return "hidden size" if self.target == SteerTarget.RESIDUAL else \
            "attention output width (heads x head_dim)"

    def edits(self) -> list[SteerEdit]:
        self._check_target_fields()
        if self.target == SteerTarget.RESIDUAL:
            return [self._edit(layer, direction) for layer, direction in self._directions(
                self._residual_layers())]
        return self._head_edits()

    def _check_target_fields(self) -> None:
        item = self.item
        if item.mode == "ablate" and "scale" in item.model_fields_set:
            self._fail("scale", "ablate removes the component along the vector: it takes no "
                       "scale (clamp sets the component to `scale`)")
        if self.target == SteerTarget.RESIDUAL:
            if item.heads is not None:
                self._fail("heads", "heads is only for target 'heads'")
            return
        if item.mode != "add":
            self._fail("mode", "head offsets are added: mode must be 'add' for target 'heads'")
        if item.normalize:
            self._fail("normalize", "normalize is only for target 'residual'")
        if item.heads is None:
            self._fail("heads", "target 'heads' needs 'heads': a list of [layer, head] pairs")
        if item.layers is not None:
            self._fail("layers", "for target 'heads' the layers come from 'heads'")

    def _residual_layers(self) -> list[int]:
        if self.item.layers is not None:
            return layer_list(self.item.layers, self.shape.num_layers, f"{self.param}.layers")
        if self.named is None:
            self._fail("layers", "layers is required with inline values")
        return layer_list(self.named.layers, self.shape.num_layers, f"{self.param}.vector")

    def _directions(self, layers: list[int]) -> list[tuple[int, torch.Tensor]]:
        """One (width,) fp32 direction per layer, on the model's device."""
        if self.named is not None:
            missing = [layer for layer in layers if layer not in self.named.directions]
            if missing:
                self._fail("layers", f"vector '{self.named.name}' has no direction for layer "
                           f"{missing[0]} (it has {self.named.layers})")
            return [(layer, self.named.directions[layer].to(self.device)) for layer in layers]
        values = self.item.values
        per_layer = values if isinstance(values[0], list) else [values] * len(layers)
        if len(per_layer) != len(layers):
            self._fail("values", f"{len(per_layer)} inline vectors for {len(layers)} layers")
        for row in per_layer:
            if len(row) != self.width:
                self._fail("values", f"inline vector has {len(row)} entries, but this model's "
                           f"{self._width_name()} is {self.width}")
        shared = {}  # one tensor per distinct row, so batches send it once
        return [(layer, shared.setdefault(id(row), torch.tensor(
            row, dtype=torch.float32, device=self.device)))
            for layer, row in zip(layers, per_layer, strict=True)]

    def _edit(self, layer: int, vector: torch.Tensor) -> SteerEdit:
        item = self.item
        return SteerEdit(layer, self.target, vector, item.scale, _MODES[item.mode],
                         item.normalize, ApplyTo(item.apply_to))

    def _head_edits(self) -> list[SteerEdit]:
        by_layer: dict[int, list[int]] = {}
        last_layer, last_head = self.shape.num_layers - 1, self.shape.num_heads - 1
        for layer, head in self.item.heads:
            if not 0 <= layer <= last_layer:
                self._fail("heads", f"layer {layer} is out of range (0..{last_layer})")
            if not 0 <= head <= last_head:
                self._fail("heads", f"head {head} is out of range (0..{last_head})")
            by_layer.setdefault(layer, []).append(head)
        edits = []
        for layer, direction in self._directions(sorted(by_layer)):
            full = direction.view(self.shape.num_heads, self.shape.head_dim)
            offsets = torch.zeros_like(full)  # (NH, D): heads not listed stay untouched
            chosen = sorted(set(by_layer[layer]))
            offsets[chosen] = full[chosen]
            edits.append(self._edit(layer, offsets))
        return edits
