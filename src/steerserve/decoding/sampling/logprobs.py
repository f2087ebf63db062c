"""Turn logprob tensors into per-token records with their text."""

from __future__ import annotations

import torch

from steerserve.decoding.request import TokenLogprob, TopLogprob


class TokenText:
    """Token id -> display text, cached (the same ids come back constantly)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def token_logprob(text: TokenText, token_id: int, logprob: float,
                  top_ids: list[int], top_values: list[float]) -> TokenLogprob:
    top = tuple(TopLogprob(i, text(i), v) for i, v in zip(top_ids, top_values, strict=True))
    return TokenLogprob(token_id, text(token_id), logprob, top)


def prompt_logprobs(text: TokenText, prompt: list[int], logits: torch.Tensor | None,
                    num_top: int) -> tuple[TokenLogprob, ...]:
    """logits: (P-1, V) for positions 0..P-2; the first prompt token has no logprob."""
    first = TokenLogprob(prompt[0], text(prompt[0]), None)
    if logits is None:
        return (first,)
    logprobs = logits.log_softmax(dim=-1)
    targets = torch.tensor(prompt[1:], device=logits.device)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    if num_top > 0:
        values, ids = logprobs.topk(num_top, dim=-1)
        values, ids = values.tolist(), ids.tolist()
    else:
        values = ids = [[] for _ in chosen]
    records = [token_logprob(text, t, c, i, v)
               for t, c, i, v in zip(prompt[1:], chosen, ids, values, strict=True)]
    return (first, *records)
