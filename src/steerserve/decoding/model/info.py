"""What the rest of the system may know about a hosted model (the façade hands this out)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerserve.adapters.steering.spec import ModelShape
from steerserve.decoding.model.loader import LoadedModel


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tokenizer: object
    max_model_len: int
    vocab_size: int  # rows of the LM head: the width of its logits
    shape: ModelShape
    model_type: str
    device: torch.device
    dtype: torch.dtype
    eos_ids: frozenset[int]

    @classmethod
    def of(cls, loaded: LoadedModel, vocab_size: int) -> ModelInfo:
        config = loaded.model.config
        return cls(loaded.name, loaded.tokenizer, loaded.max_model_len, vocab_size,
                   ModelShape.of(config), config.model_type, loaded.device, loaded.dtype,
                   eos_token_ids(loaded))


def eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(i for i in ids if i is not None)
