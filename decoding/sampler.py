"""Batched sampling where every row has its own parameters.

Order per row: logit bias -> penalties -> (logprobs are read here) -> temperature ->
top-k / top-p / min-p -> draw. Logprobs therefore describe the model's (method-combined,
penalised, biased) distribution before temperature and truncation, like OpenAI's.
Each processor runs only when some row needs it; an all-greedy batch is one argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.sampling_params import SamplingParams


@dataclass
class RowState:
    """What the sampler needs to know about one row besides its logits."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None  # set for seeded rows: independent of the batch


@dataclass(frozen=True)
class SampleResult:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) chosen-token logprob, when any row asked
    top_ids: torch.Tensor | None  # (B, K) top alternatives for the widest request in the batch
    top_logprobs: torch.Tensor | None  # (B, K)


def apply_logit_bias(logits: torch.Tensor, rows: list[RowState]) -> None:
    for i, row in enumerate(rows):
        for token_id, bias in row.params.logit_bias:
            logits[i, token_id] += bias


def apply_penalties(logits: torch.Tensor, rows: list[RowState]) -> None:
    """OpenAI presence/frequency penalties on generated tokens; HF-style repetition penalty
    over prompt and generated tokens (vLLM's semantics)."""
    for i, row in enumerate(rows):
        p = row.params
        if not p.penalizes:
            continue
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(row.prompt_ids + row.output_ids, device=logits.device).unique()
            picked = logits[i, seen]
            logits[i, seen] = torch.where(picked > 0, picked / p.repetition_penalty,
                                          picked * p.repetition_penalty)
        if row.output_ids and (p.presence_penalty or p.frequency_penalty):
            ids, counts = torch.tensor(row.output_ids, device=logits.device).unique(
                return_counts=True)
            logits[i, ids] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty


def truncation_mask(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Boolean (B, V) mask of tokens removed by each row's top-k, top-p and min-p."""
    vocab = logits.shape[-1]
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows],
                         device=logits.device)
    top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
    min_p = torch.tensor([r.params.min_p for r in rows], device=logits.device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    removed = ranks >= top_k.unsqueeze(1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
    removed |= (probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)
    removed |= probs < min_p.unsqueeze(1) * probs[:, :1]
    removed[:, 0] = False
    return torch.zeros_like(removed).scatter_(1, order, removed)


def draw(probs: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Exponential-race sampling: argmax(p / E), E ~ Exp(1), one noise row per request.
    Seeded rows draw their noise from their own generator, so their tokens do not depend on
    what else is in the batch."""
    noise = torch.empty_like(probs)
    for i, row in enumerate(rows):
        noise[i].exponential_(generator=row.generator)
    return (probs / noise).argmax(dim=-1)


def logprob_summary(logprobs: torch.Tensor, tokens: torch.Tensor, rows: list[RowState]):
    widest = max((r.params.logprobs or 0) for r in rows)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if widest == 0:
        return chosen, None, None
    top_values, top_ids = logprobs.topk(widest, dim=-1)
    return chosen, top_ids, top_values


def sample(logits: torch.Tensor, rows: list[RowState]) -> SampleResult:
    """logits: (B, V) float32, modified in place."""
    if any(r.params.logit_bias for r in rows):
        apply_logit_bias(logits, rows)
    if any(r.params.penalizes for r in rows):
        apply_penalties(logits, rows)
    wants_logprobs = any(r.params.logprobs is not None for r in rows)
    logprobs = logits.log_softmax(dim=-1) if wants_logprobs else None
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        tokens[sampled] = sample_rows(logits[sampled], [rows[i] for i in sampled])
    if logprobs is None:
        return SampleResult(tokens, None, None, None)
    return SampleResult(tokens, *logprob_summary(logprobs, tokens, rows))


def sample_rows(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    temperature = torch.tensor([r.params.temperature for r in rows], device=logits.device)
    logits = logits / temperature.unsqueeze(1)
    if any(r.params.truncates for r in rows):
        logits = logits.masked_fill(truncation_mask(logits, rows), float("-inf"))
    return draw(logits.softmax(dim=-1), rows)
