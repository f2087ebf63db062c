"""What logit bias and penalties need of one request, as dense rows over its vocabulary.

Built once when the request is admitted and updated by one index per generated token, so a
step's sampling cost depends on the batch and the vocabulary only: not on the prompt, the
output so far, nor how many logit_bias keys or repeated tokens the request carries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerserve.decoding.sampling.params import SamplingParams


@dataclass
class TokenHistory:
    bias: torch.Tensor | None  # (V,) float32: the request's logit_bias
    seen: torch.Tensor | None  # (V,) bool: prompt and output tokens (repetition penalty)
    counts: torch.Tensor | None  # (V,) float32: output token counts (presence, frequency)

    @classmethod
    def for_request(cls, params: SamplingParams, prompt_ids: tuple[int, ...], vocab_size: int,
                    device: torch.device) -> TokenHistory | None:
        if not params.logit_bias and not params.penalizes:
            return None
        bias = seen = counts = None
        if params.logit_bias:
            ids, values = zip(*params.logit_bias, strict=True)
            bias = torch.zeros(vocab_size, device=device)
            bias[torch.tensor(ids, device=device)] = torch.tensor(values, device=device)
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            seen[torch.tensor(prompt_ids, device=device)] = True
        if params.presence_penalty or params.frequency_penalty:
            counts = torch.zeros(vocab_size, device=device)
        return cls(bias, seen, counts)

    def add(self, token: int) -> None:
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1.0


def rows(values: list[torch.Tensor], width: int) -> torch.Tensor:
    """(R, width): one request row each, padded where its vocabulary is narrower."""
    return torch.stack([torch.nn.functional.pad(v, (0, width - v.shape[-1])) for v in values])
