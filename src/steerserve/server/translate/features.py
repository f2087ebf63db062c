"""A `steering` item that names a sparse-autoencoder feature -> FeatureEdits, every field
checked, errors naming the item's field (`steering.<i>.<field>`)."""

from __future__ import annotations

import torch

from steerserve.adapters.sae.autoencoder import SparseAutoencoder
from steerserve.adapters.steering.spec import ApplyTo, FeatureEdit, ModelShape
from steerserve.server.errors import APIError
from steerserve.server.schemas.steering import SteeringItem

# Fields of vector items that an SAE item does not take (its layer is the SAE's hook point).
_VECTOR_ONLY = ("vector", "values", "layers", "heads", "mode", "normalize", "target")


def feature_edit(item: SteeringItem, param: str, saes: dict[str, SparseAutoencoder],
                 shape: ModelShape, device: torch.device) -> FeatureEdit:
    def fail(field: str, message: str, status: int = 400, code: str | None = None):
        raise APIError(status, message, f"{param}.{field}", code)

    for field in _VECTOR_ONLY:
        if field in item.model_fields_set:
            fail(field, f"'{field}' is for vector items; an 'sae' item edits the feature at "
                 "the SAE's own layer")
    sae = saes.get(item.sae)
    if sae is None:
        fail("sae", f"no SAE named '{item.sae}' (loaded: {', '.join(sorted(saes)) or 'none'})",
             404, "sae_not_found")
    if sae.d_in != shape.hidden_size or sae.layer >= shape.num_layers:
        fail("sae", f"SAE '{sae.name}' reads width {sae.d_in} at layer {sae.layer}; this "
             f"model has hidden size {shape.hidden_size} and {shape.num_layers} blocks")
    if item.feature is None:
        fail("feature", "an 'sae' item needs 'feature', the feature's index")
    if item.feature >= sae.d_sae:
        fail("feature", f"feature {item.feature} is out of range: SAE '{sae.name}' has "
             f"features 0..{sae.d_sae - 1}")
    clamp = item.clamp is not None
    if clamp and "scale" in item.model_fields_set:
        fail("clamp", "give 'scale' (add the feature's direction) or 'clamp' (set its "
             "activation), not both")
    if clamp and not sae.per_feature_activation:
        fail("clamp", f"SAE '{sae.name}' is TopK: a feature's activation depends on all the "
             "others, so it cannot be clamped alone; use 'scale'")
    j = item.feature
    return FeatureEdit(
        layer=sae.layer, key=(sae.name, j), encoder=sae.encoders[j].to(device),
        bias=float(sae.enc_bias[j]), threshold=float(sae.threshold[j]),
        decoder=sae.decoders[j].to(device), clamp=clamp,
        value=float(item.clamp) if clamp else item.scale, apply_to=ApplyTo(item.apply_to))
