"""A sparse autoencoder over one layer's residual stream, as steering and interpretation use it.

Everything is kept in fp32 on the model's device. The encoder is stored transposed, one row per
feature, so that a request's few features are rows to gather; `apply_b_dec_to_input` (SAELens
subtracts b_dec from the input before encoding) is folded into the encoder bias once at load:
(x - b_dec) . w_j + b_enc_j = x . w_j + (b_enc_j - b_dec . w_j).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

ARCHITECTURES = ("standard", "jumprelu", "topk")


@dataclass(frozen=True, eq=False)
class SparseAutoencoder:
    name: str
    path: Path
    hook_name: str
    layer: int  # steerserve's numbering: the output of decoder block `layer`
    architecture: str  # standard (ReLU) | jumprelu | topk
    encoders: torch.Tensor  # (d_sae, d_in): row j = W_enc[:, j]
    enc_bias: torch.Tensor  # (d_sae,) b_enc with b_dec folded in
    threshold: torch.Tensor  # (d_sae,) JumpReLU thresholds; zeros for ReLU and TopK
    decoders: torch.Tensor  # (d_sae, d_in): W_dec
    dec_bias: torch.Tensor  # (d_in,) b_dec
    k: int | None = None  # TopK's k
    model_name: str | None = None  # the model it was trained on, if its config says

    @property
    def d_in(self) -> int:
        return self.encoders.shape[1]

    @property
    def d_sae(self) -> int:
        return self.encoders.shape[0]

    @property
    def per_feature_activation(self) -> bool:
        """Whether a feature's activation depends on its own pre-activation only (ReLU,
        JumpReLU), which clamping needs; TopK's depends on every other feature's too."""
        return self.architecture != "topk"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) -> (..., d_sae) feature activations, as SAELens's encode."""
        pre = x.float() @ self.encoders.T + self.enc_bias
        if self.architecture == "topk":
            values, indices = torch.relu(pre).topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, indices, values)
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.decoders + self.dec_bias

    def describe(self) -> dict:
        return {"id": self.name, "object": "sae", "hook_name": self.hook_name,
                "layer": self.layer, "d_in": self.d_in, "d_sae": self.d_sae,
                "architecture": self.architecture, "k": self.k, "model": self.model_name}
