"""Co-LLM's deferral head: which model generates the next token, from the base's last state.

A linear map of the base model's final (normed) hidden state, the vector its LM head reads,
to one score per assistant; with the base's score fixed at 0, a softmax over [0, scores]
gives P(base generates) and P(assistant m generates). With one assistant that is the paper's
sigmoid. Files are safetensors only: `weight` (M, H), `bias` (M,), and in the metadata
"format" = FORMAT and "config" = {"hidden_size", "assistants", "model"} as JSON (the model and
the assistants it was trained for, informational).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from steerserve.adapters.tagged_files import read_tagged

FORMAT = "steerserve.deferral_head"
MAX_ASSISTANTS = 4
MAX_HIDDEN = 1 << 16


@dataclass(frozen=True)
class DeferralHeadConfig:
    hidden_size: int
    assistants: tuple[str, ...]  # what each score was trained to call on
    model: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "assistants", tuple(self.assistants))
        if not isinstance(self.hidden_size, int) or not 0 < self.hidden_size <= MAX_HIDDEN:
            raise ValueError(f"hidden_size must be an integer in 1..{MAX_HIDDEN}")
        if not 1 <= len(self.assistants) <= MAX_ASSISTANTS or not all(
                isinstance(a, str) for a in self.assistants):
            raise ValueError(f"assistants must name 1..{MAX_ASSISTANTS} models")


class DeferralHead:
    def __init__(self, config: DeferralHeadConfig, weight: torch.Tensor,
                 bias: torch.Tensor) -> None:
        self.config = config
        self.weight = weight.float()  # (M, H)
        self.bias = bias.float()  # (M,)

    @property
    def assistants(self) -> int:
        return len(self.config.assistants)

    def to(self, device: torch.device | str) -> DeferralHead:
        return DeferralHead(self.config, self.weight.to(device), self.bias.to(device))

    def probabilities(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) final hidden states -> (N, 1 + M): P(base), P(assistant 1), ..."""
        scores = hidden.float() @ self.weight.T + self.bias  # (N, M)
        return torch.cat([scores.new_zeros(len(scores), 1), scores], dim=-1).softmax(-1)


def save_deferral_head(head: DeferralHead, path: str | Path) -> None:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"deferral head files must end in .safetensors: '{path}'")
    tensors = {"weight": head.weight.detach().cpu().contiguous().clone(),
               "bias": head.bias.detach().cpu().contiguous().clone()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT,
                                            "config": json.dumps(asdict(head.config))})


def load_deferral_head(path: str | Path, hidden_size: int | None = None) -> DeferralHead:
    """Load and check a head file (ValueError naming the problem); `hidden_size`, when given,
    must be the head's."""
    path = Path(path)
    metadata, tensors = read_tagged(path, FORMAT, "deferral head")
    try:
        fields = json.loads(metadata.get("config", ""))
        config = DeferralHeadConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"deferral head '{path}': bad config: {exc}") from exc
    _check_tensors(path, config, tensors)
    if hidden_size is not None and hidden_size != config.hidden_size:
        raise ValueError(f"deferral head '{path}' reads hidden states of width "
                         f"{config.hidden_size}, the model's are {hidden_size} wide")
    return DeferralHead(config, tensors["weight"], tensors["bias"])


def _check_tensors(path: Path, config: DeferralHeadConfig,
                   tensors: dict[str, torch.Tensor]) -> None:
    m, h = len(config.assistants), config.hidden_size
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if shapes != {"weight": (m, h), "bias": (m,)}:
        raise ValueError(f"deferral head '{path}': tensors {shapes}, expected weight {(m, h)} "
                         f"and bias {(m,)}")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"deferral head '{path}': '{name}' is not finite floating point")
