"""A learned temperature head (ADAPTIVEDECODER, Dhuliawala et al. 2024).

A small module on the decoder's final hidden state (after the final norm, the vector the LM
head reads) that outputs a categorical distribution over a fixed, ascending temperature set.
Per token ("token" level) the state at the position being sampled picks that token's
temperature; per response ("sequence" level) the state at the last prompt position picks one
temperature for the whole response. Temperature 0.0 means greedy (argmax).

Files are safetensors only (never pickle): the tensors of the module plus, in the metadata,
"format" = FORMAT and "config" = the config as a JSON string.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from steerserve.adapters.tagged_files import read_tagged

FORMAT = "steerserve.temperature_head"
LEVELS = ("token", "sequence")
MIN_TEMPERATURES = 2
MAX_TEMPERATURES = 32
MAX_SIZE = 1 << 16  # generous bound on hidden/inner sizes; rejects absurd configs early


@dataclass(frozen=True)
class TemperatureHeadConfig:
    hidden_size: int
    temperatures: tuple[float, ...]
    inner_size: int = 0  # 0: one Linear; else Linear -> GELU -> Linear
    level: str = "token"  # the level it was trained for; a request may override it
    model: str | None = None  # the model it was trained on (informational)

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise the sequence to a tuple of floats before validating.
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        problem = _config_problem(self)
        if problem is not None:
            raise ValueError(f"invalid temperature head config: {problem}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TemperatureHeadConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("the config is not a JSON object")
        known = {"hidden_size", "temperatures", "inner_size", "level", "model"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        if not isinstance(data.get("temperatures"), list):
            raise ValueError("'temperatures' must be a list of numbers")
        return cls(**data)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _config_problem(config: TemperatureHeadConfig) -> str | None:
    if not _is_int(config.hidden_size) or not 0 < config.hidden_size <= MAX_SIZE:
        return f"hidden_size must be an integer in 1..{MAX_SIZE}, got {config.hidden_size!r}"
    if not _is_int(config.inner_size) or not 0 <= config.inner_size <= MAX_SIZE:
        return f"inner_size must be an integer in 0..{MAX_SIZE}, got {config.inner_size!r}"
    temps = config.temperatures
    if not MIN_TEMPERATURES <= len(temps) <= MAX_TEMPERATURES:
        return f"need {MIN_TEMPERATURES}..{MAX_TEMPERATURES} temperatures, got {len(temps)}"
    if any(not math.isfinite(t) or t < 0 for t in temps):
        return f"temperatures must be finite and >= 0, got {list(temps)}"
    if any(b <= a for a, b in zip(temps, temps[1:], strict=False)):
        return f"temperatures must be strictly ascending, got {list(temps)}"
    if config.level not in LEVELS:
        return f"level must be one of {LEVELS}, got {config.level!r}"
    if config.model is not None and not isinstance(config.model, str):
        return f"model must be a string or null, got {config.model!r}"
    return None


class TemperatureHead(nn.Module):
    """hidden (N, H) -> logits over the temperature set (N, T)."""

    def __init__(self, config: TemperatureHeadConfig) -> None:
        super().__init__()
        self.config = config
        num_t = len(config.temperatures)
        if config.inner_size == 0:
            self.net: nn.Module = nn.Linear(config.hidden_size, num_t)
        else:
            self.net = nn.Sequential(
                nn.Linear(config.hidden_size, config.inner_size),
                nn.GELU(),
                nn.Linear(config.inner_size, num_t),
            )
        # A buffer so .to(device) moves it with the weights; not saved (it is in the config).
        temps = torch.tensor(config.temperatures, dtype=torch.float32)
        self.register_buffer("temperatures", temps, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden (N, H) -> (N, T); computed in fp32 whatever the model's dtype.
        weight = next(self.parameters())
        return self.net(hidden.to(dtype=weight.dtype, device=weight.device))

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self(hidden), dim=-1)  # (N, T)

    def choose(
        self,
        hidden: torch.Tensor,
        greedy: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick one temperature per row: (indices (N,) int64, temperatures (N,) fp32)."""
        with torch.no_grad():
            logits = self(hidden)  # (N, T)
            if greedy:
                indices = logits.argmax(dim=-1)
            else:
                probs = torch.softmax(logits, dim=-1)
                if generator is not None:  # made on the model's device; the head may differ
                    probs = probs.to(generator.device)
                indices = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                indices = indices.to(logits.device)
        return indices, self.temperatures[indices]


def save_temperature_head(head: TemperatureHead, path: str | Path) -> None:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"temperature head files must end in .safetensors: '{path}'")
    tensors = {
        name: tensor.detach().to(torch.float32).cpu().contiguous()
        for name, tensor in head.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": head.config.to_json()})


def load_temperature_head(path: str | Path, hidden_size: int | None = None) -> TemperatureHead:
    """Load and validate a head file; `hidden_size`, when given, must match the head's."""
    path = Path(path)
    metadata, tensors = read_tagged(path, FORMAT, "temperature head")
    config = _read_config(path, metadata)
    if hidden_size is not None and hidden_size != config.hidden_size:
        raise ValueError(
            f"temperature head '{path}' expects hidden size {config.hidden_size}, "
            f"but the model's hidden size is {hidden_size}"
        )
    head = TemperatureHead(config)
    _check_tensors(path, head, tensors)
    head.load_state_dict({name: t.to(torch.float32) for name, t in tensors.items()})
    return head.to(torch.float32).eval()


def _read_config(path: Path, metadata: dict[str, str]) -> TemperatureHeadConfig:
    if "config" not in metadata:
        raise ValueError(f"temperature head '{path}': no 'config' in the metadata")
    try:
        return TemperatureHeadConfig.from_json(metadata["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"temperature head '{path}': bad config: {exc}") from exc


def _check_tensors(path: Path, head: TemperatureHead, tensors: dict[str, torch.Tensor]) -> None:
    expected = {name: tuple(t.shape) for name, t in head.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:
        raise ValueError(
            f"temperature head '{path}': tensors {got} do not match the config, "
            f"expected {expected}"
        )
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"temperature head '{path}': tensor '{name}' is not floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"temperature head '{path}': tensor '{name}' has NaN or inf")
