"""Batched sampling where every row has its own parameters.

Order per row: logit bias -> penalties -> (logprobs are read here) -> temperature ->
grammar -> top-k / top-p / min-p -> draw. Logprobs therefore describe the model's
(method-combined, penalised, biased) distribution before temperature, grammar and
truncation, like OpenAI's; adaptive temperatures read the distribution before the grammar.
Each processor runs only when some row needs it; an all-greedy batch is one argmax.
Adaptive temperatures (decoding/sampling/adaptive.py) go through one fused kernel; rows
using llama.cpp's dynatemp are truncated before it, as in llama.cpp's sampler chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steerserve.decoding.sampling.grammar import GrammarMask
from steerserve.decoding.sampling.history import TokenHistory
from steerserve.decoding.sampling.history import rows as stacked
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.kernels.adaptive_temperature.ops import TempMethod, adaptive_temperature


@dataclass
class RowState:
    """What the sampler needs to know about one row besides its logits."""

    params: SamplingParams
    history: TokenHistory | None = None  # logit bias and penalty rows, when the row has any
    generator: torch.Generator | None = None  # set for seeded rows: independent of the batch
    given_temperature: float | None = None  # this step's choice of a learned head


@dataclass(frozen=True)
class SampleResult:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor | None  # (B,) chosen-token logprob, when any row asked
    top_ids: torch.Tensor | None  # (B, K) top alternatives for the widest request in the batch
    top_logprobs: torch.Tensor | None  # (B, K)
    temperatures: torch.Tensor | None = None  # (B,) the temperature used (0 = greedy)


def _with(rows: list[RowState], field: str) -> list[int]:
    return [i for i, r in enumerate(rows) if r.history is not None
            and getattr(r.history, field) is not None]


def apply_logit_bias(logits: torch.Tensor, rows: list[RowState]) -> None:
    """One add for every biased row, whatever the number of keys."""
    picked = _with(rows, "bias")
    if picked:
        logits[picked] += stacked([rows[i].history.bias for i in picked], logits.shape[1])


def apply_penalties(logits: torch.Tensor, rows: list[RowState]) -> None:
    """OpenAI presence/frequency penalties on generated tokens; HF-style repetition penalty
    over prompt and generated tokens (vLLM's semantics). A few batched ops per step."""
    width = logits.shape[1]
    repeated = _with(rows, "seen")
    if repeated:
        seen = stacked([rows[i].history.seen for i in repeated], width)
        penalty = logits.new_tensor([rows[i].params.repetition_penalty for i in repeated])
        picked, penalty = logits[repeated], penalty.unsqueeze(1)
        penalised = torch.where(picked > 0, picked / penalty, picked * penalty)
        logits[repeated] = torch.where(seen, penalised, picked)
    counted = _with(rows, "counts")
    if counted:
        counts = stacked([rows[i].history.counts for i in counted], width)
        frequency = logits.new_tensor([rows[i].params.frequency_penalty for i in counted])
        presence = logits.new_tensor([rows[i].params.presence_penalty for i in counted])
        logits[counted] -= (frequency.unsqueeze(1) * counts
                            + presence.unsqueeze(1) * (counts > 0).to(logits.dtype))


CANDIDATES = (256, 4096)  # tokens ranked per row before truncating, tier by tier


def truncation_mask(logits: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Boolean (B, V) mask of tokens removed by each row's top-k, top-p and min-p.

    Exact, and cheap for the usual settings: ranking a row's top candidates (a partial sort)
    is enough when its kept set ends inside them (top-k within them, or their mass reaching
    top-p, or min-p cutting inside them). Rows try 256 candidates, then 4096, and only rows
    that keep more sort the whole vocabulary (on 8 rows of 49k logits, 2-core machine: a full
    sort 15 ms, top-4096 2.9 ms, top-256 0.8 ms)."""
    vocab = logits.shape[-1]
    params = _truncation_params(rows, vocab, logits.device)
    removed = torch.zeros_like(logits, dtype=torch.bool)
    pending = [i for i, r in enumerate(rows) if r.params.truncates]
    for count in CANDIDATES:
        if not pending or count >= vocab:
            break
        part = logits if len(pending) == len(rows) else logits[pending]
        ranked, ends_inside = _ranked_mask(part, count, *(p[pending] for p in params))
        inside = ends_inside.tolist()
        removed[[i for i, ok in zip(pending, inside, strict=True) if ok]] = ranked[ends_inside]
        pending = [i for i, ok in zip(pending, inside, strict=True) if not ok]
    if pending:
        removed[pending] = _full_sort_mask(logits[pending], *(p[pending] for p in params))
    return removed


def _ranked_mask(logits: torch.Tensor, count: int, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The removal mask from each row's top `count` logits, and whether the row's kept set
    ends inside them (where it does not, the mask is not the row's)."""
    top_ids = logits.topk(count, dim=-1).indices  # (R, K), descending
    # the full sort's probabilities to the last bit, so a boundary at top-p falls alike
    probs = logits.softmax(dim=-1).gather(1, top_ids)
    removed_top = _removed_ranks(probs, top_k, top_p, min_p)
    # the candidates' mass as the ranks' own cumulative sum sees it (a sum reduced in another
    # order can reach top_p where the cumulative sum does not); top_p = 1 keeps everything
    mass = probs.cumsum(dim=-1)[:, -1]
    ends_inside = ((top_k <= count) | ((mass >= top_p) & (top_p < 1))
                   | (probs[:, -1] < min_p * probs[:, 0]))
    removed = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top_ids, removed_top)
    return removed, ends_inside


def _truncation_params(rows: list[RowState], vocab: int, device: torch.device):
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else vocab for r in rows],
                         device=device)
    top_p = torch.tensor([r.params.top_p for r in rows], device=device)
    min_p = torch.tensor([r.params.min_p for r in rows], device=device)
    return top_k, top_p, min_p


def _removed_ranks(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                   min_p: torch.Tensor) -> torch.Tensor:
    """Over probabilities sorted descending (B, R): which ranks each row removes."""
    ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
    removed = ranks >= top_k.unsqueeze(1)
    # Keep the smallest prefix whose mass reaches top_p (the first token is always kept);
    # top_p = 1 keeps all (a rounded cumulative sum may pass 1 before the tail).
    removed |= ((probs.cumsum(dim=-1) - probs) >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    removed |= probs < min_p.unsqueeze(1) * probs[:, :1]
    removed[:, 0] = False
    return removed


def _full_sort_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor) -> torch.Tensor:
    # softmax in vocabulary order, then sorted: the ranked tiers' probabilities, bit for bit
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    removed = _removed_ranks(probs, top_k, top_p, min_p)
    return torch.zeros_like(removed).scatter_(1, order, removed)


def draw(probs: torch.Tensor, rows: list[RowState]) -> torch.Tensor:
    """Inverse-CDF sampling: the first token whose cumulative probability passes u times the
    row's total, u ~ U[0, 1), one number per row (an exponential race needs one per token: a
    49k-token row cost 1.1 ms, the cumulative sum 0.05 ms; docs/benchmarks.md). Seeded rows
    draw u from their own generator, so their tokens do not depend on the batch; a token of
    probability 0 is never the first to pass (its cumulative sum equals its predecessor's)."""
    uniform = torch.empty(len(rows), device=probs.device)
    unseeded = [i for i, row in enumerate(rows) if row.generator is None]
    if unseeded:
        uniform[unseeded] = torch.rand(len(unseeded), device=probs.device)
    for i, row in enumerate(rows):
        if row.generator is not None:
            uniform[i] = torch.rand(1, generator=row.generator, device=probs.device)[0]
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[:, -1]
    # below the total even where u * total rounds up to it: the last kept token then wins
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cumulative, target.unsqueeze(1), right=True).squeeze(1)
    # a row that is no distribution (a model's NaN): its argmax, never an index past the end
    return torch.where(total > 0, tokens, probs.argmax(dim=-1))


def logprob_summary(logprobs: torch.Tensor, tokens: torch.Tensor, rows: list[RowState]):
    widest = max((r.params.logprobs or 0) for r in rows)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    if widest == 0:
        return chosen, None, None
    top_values, top_ids = logprobs.topk(widest, dim=-1)
    return chosen, top_ids, top_values


def sample(logits: torch.Tensor, rows: list[RowState],
           grammar: GrammarMask | None = None) -> SampleResult:
    """logits: (B, V) float32, modified in place."""
    if any(r.history is not None for r in rows):
        apply_logit_bias(logits, rows)
        apply_penalties(logits, rows)
    wants_logprobs = any(r.params.logprobs is not None for r in rows)
    logprobs = logits.log_softmax(dim=-1) if wants_logprobs else None
    if grammar is not None and not any(r.params.adaptive for r in rows):
        grammar.apply_(logits)  # before a fixed temperature is the same as after it
        grammar = None
    tokens = logits.argmax(dim=-1)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    if grammar is not None and greedy:  # adaptive rows read the logits before the grammar
        inside = logits[greedy]
        grammar.rows(greedy).apply_(inside)
        tokens[greedy] = inside.argmax(dim=-1)
    temperatures = torch.zeros(len(rows), device=logits.device)
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        tokens[sampled], temperatures[sampled] = sample_rows(
            logits[sampled], [rows[i] for i in sampled],
            grammar.rows(sampled) if grammar is not None else None)
    if logprobs is None:
        return SampleResult(tokens, None, None, None, temperatures)
    return SampleResult(tokens, *logprob_summary(logprobs, tokens, rows), temperatures)


def sample_rows(logits: torch.Tensor, rows: list[RowState], grammar: GrammarMask | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and temperatures of rows that sample. logits (B, V) may be modified."""
    if not any(r.params.adaptive for r in rows):
        temperature = torch.tensor([r.params.temperature for r in rows], device=logits.device)
        logits = logits / temperature.unsqueeze(1)
        if grammar is not None:
            grammar.apply_(logits)
        if any(r.params.truncates for r in rows):
            logits = logits.masked_fill(truncation_mask(logits, rows), float("-inf"))
        return draw(logits.softmax(dim=-1), rows), temperature
    return sample_adaptive(logits, rows, grammar)


def _kernel_args(rows: list[RowState], device: torch.device) -> list[torch.Tensor]:
    method, t0, param_a, param_b = [], [], [], []
    for row in rows:
        rule = row.params.adaptive
        if rule is None:
            method.append(TempMethod.FIXED)
            t0.append(row.params.temperature)
            param_a.append(0.0)
            param_b.append(0.0)
            continue
        method.append(rule.kernel_method)
        t0.append(row.given_temperature if rule.method == "learned" else rule.t0)
        a, b = rule.kernel_params
        param_a.append(a)
        param_b.append(b)
    return [torch.tensor(method, dtype=torch.int8, device=device),
            *(torch.tensor(v, dtype=torch.float32, device=device) for v in (t0, param_a,
                                                                            param_b))]


def sample_adaptive(logits: torch.Tensor, rows: list[RowState],
                    grammar: GrammarMask | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    first = [i for i, r in enumerate(rows) if _truncates_first(r)]
    if first:  # llama.cpp's chain: grammar, then truncation, then dynatemp
        kept, first_rows = logits[first], [rows[i] for i in first]
        if grammar is not None:
            grammar.rows(first).apply_(kept)
        logits[first] = kept.masked_fill(truncation_mask(kept, first_rows), float("-inf"))
    greedy_tokens = logits.argmax(dim=-1)
    temperature = adaptive_temperature(logits, *_kernel_args(rows, logits.device))
    if grammar is not None:  # after the temperature: it reads the model's own distribution
        grammar.apply_(logits)
        greedy_tokens = torch.where(grammar.constrained, logits.argmax(dim=-1), greedy_tokens)
    after = [r.params.truncates and not _truncates_first(r) for r in rows]
    if any(after):
        removed = truncation_mask(logits, rows)  # (B, V), in place: no row copies
        removed &= torch.tensor(after, device=logits.device).unsqueeze(1)
        logits.masked_fill_(removed, float("-inf"))
    tokens = draw(logits.softmax(dim=-1), rows)
    return torch.where(temperature > 0, tokens, greedy_tokens), temperature


def _truncates_first(row: RowState) -> bool:
    rule = row.params.adaptive
    return rule is not None and rule.method == "dynatemp" and row.params.truncates
