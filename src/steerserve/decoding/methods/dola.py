"""DoLa (Chuang et al. 2024): lsm(mature) - lsm(premature), over the mature-plausible set.

The premature layer is, per token, the candidate layer whose distribution (final norm and LM
head applied early) has the largest Jensen-Shannon divergence from the mature one.

Layers are counted as in the reference code (and `dola_layers` in transformers): hidden state
0 is the embedding output and hidden state j the output of block j - 1, so a model of N blocks
has candidates 0..N-1 and the mature distribution is hidden state N. The buckets are the
reference's: `low` = range(0, N // 2, 2), `high` = range(N // 2, N, 2) (for N > 40, the first
and last 20). `layer_indexing: "blocks"` counts block outputs from 0 instead, with buckets of
every second block of each half. Internally a candidate is a block index, EMBEDDINGS (-1) for
the embedding output. `relative_top` 0 turns the plausibility mask off, as the reference's
multiple-choice scoring runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from steerserve.decoding.methods.base import (
    DecodingMethod,
    EarlyExits,
    LanePlanner,
    LaneView,
    Mix,
    ParamError,
    derived,
    lane,
    param,
)
from steerserve.decoding.request import LaneSpec

SCORING_BLOCK = 8  # prompt positions whose early exits are scored together


@dataclass(frozen=True)
class DoLaParams:
    layers: Literal["low", "high"] | list[int] | None = param(
        None, doc="candidate premature layers: the bucket 'low' or 'high' (default) or layer "
        "indices, counted as `layer_indexing` says", max_length=256)
    relative_top: float | None = param(None, doc="plausibility threshold under the mature "
                                       "distribution (default 0.1; 0: no mask, as the "
                                       "reference's multiple-choice scoring)", ge=0.0, le=1.0)
    layer_indexing: Literal["hidden_states", "blocks"] | None = param(
        None, doc="'hidden_states' (default, the reference's: 0 is the embedding output, j the "
        "output of block j - 1) or 'blocks' (0 is the first block's output)")


@dataclass(frozen=True, eq=False)
class DoLa(DecodingMethod):
    name: ClassVar[str] = "dola"
    Params: ClassVar[type] = DoLaParams
    lanes: tuple[LaneSpec, ...]  # the mature lane
    layers: tuple[int, ...] = ()  # block indices; EMBEDDINGS for the embedding output
    relative_top: float = 0.1

    @classmethod
    def build(cls, params: DoLaParams, planner: LanePlanner) -> DoLa:
        num_layers = planner.model(planner.base.model).shape.num_layers
        top = 0.1 if params.relative_top is None else params.relative_top
        if params.layer_indexing == "blocks":
            layers = candidate_blocks(params.layers, num_layers)
        else:
            # hidden state h is block h - 1's output; h = 0 gives EMBEDDINGS (-1)
            layers = tuple(h - 1 for h in candidate_hidden_states(params.layers, num_layers))
        return cls((planner.base,), layers, top)

    def mix(self) -> Mix:
        return Mix((lane(0), derived(0, -1.0)), True,
                   plausible=0 if self.relative_top > 0 else None, alpha=self.relative_top)

    def capture_layers(self, position: int) -> tuple[int, ...]:
        return self.layers if position == 0 else ()

    @classmethod
    def step_rows(cls, members: list[tuple[DecodingMethod, LaneView]],
                  early_exits: EarlyExits) -> list[torch.Tensor | None]:
        """One LM-head call per model for every member's early exits (the head's weights are
        read once, not once per request: 4.6x faster at 8 requests), and one divergence
        computation for the members with as many candidates."""
        rows: list[torch.Tensor | None] = [None] * len(members)
        by_model: dict[str, list[int]] = {}
        for i, (method, _) in enumerate(members):
            by_model.setdefault(method.lanes[0].model, []).append(i)
        for model, group in by_model.items():
            states = [_last_states(*members[i]) for i in group]  # each (K, C)
            logits = early_exits(model, torch.cat(states)).split([len(s) for s in states])
            by_count: dict[int, list[int]] = {}
            for k, candidates in enumerate(logits):
                by_count.setdefault(len(candidates), []).append(k)
            for alike in by_count.values():
                mature = torch.stack([members[group[k]][1].logits(0) for k in alike])  # (G, V)
                chosen = premature(mature, torch.stack([logits[k] for k in alike]))  # (G, V)
                for k, row in zip(alike, chosen, strict=True):
                    rows[group[k]] = row.unsqueeze(0)
        return rows

    def prompt_rows(self, view: LaneView, count: int,
                    early_exits: EarlyExits) -> torch.Tensor:
        """Every prompt position: (count, K) early exits through the LM head and their
        divergences, a block of positions at a time (the (positions, K, V) intermediates of
        a whole prompt are hundreds of MB; a block stays in cache)."""
        states = torch.stack([view.early(0)[layer][-count - 1:-1] for layer in self.layers],
                             dim=1)  # (count, K, C): position t predicts prompt token t + 1
        mature = view.prompt_logits(0)[-count:]  # (count, V)
        rows = []
        for start in range(0, count, SCORING_BLOCK):
            block = states[start:start + SCORING_BLOCK]
            logits = early_exits(self.lanes[0].model, block.flatten(0, 1))
            rows.append(premature(mature[start:start + SCORING_BLOCK],
                                  logits.view(len(block), len(self.layers), -1)))
        return torch.cat(rows).unsqueeze(1)  # (count, 1, V)


def _last_states(method: DecodingMethod, view: LaneView) -> torch.Tensor:
    early = view.early(0)
    return torch.stack([h if h.dim() == 1 else h[-1] for h in
                        (early[layer] for layer in method.layers)])


def candidate_hidden_states(layers: str | list[int] | None, num_layers: int) -> tuple[int, ...]:
    """The reference's candidates, as hidden-state indices (0 = the embedding output)."""
    if isinstance(layers, list):
        chosen = tuple(sorted(set(layers)))
        if not chosen or any(not 0 <= h < num_layers for h in chosen):
            raise ParamError("layers", f"DoLa's premature layers must lie in 0..{num_layers - 1}"
                             f" (hidden state {num_layers} is the mature distribution)")
        return chosen
    half = num_layers // 2
    if (layers or "high") == "low":
        return tuple(range(0, half if num_layers <= 40 else 20, 2)) or (0,)
    return tuple(range(half if num_layers <= 40 else num_layers - 20, num_layers, 2))


def candidate_blocks(layers: str | list[int] | None, num_layers: int) -> tuple[int, ...]:
    """Block indices: a bucket (every second block output of one half, the final block
    excluded: its normed output is the mature distribution) or explicit blocks."""
    chosen = dola_bucket(layers or "high", num_layers) if not isinstance(layers, list) \
        else tuple(sorted(set(layers)))
    if isinstance(layers, list) and (not chosen or any(not 0 <= layer < num_layers - 1
                                                       for layer in chosen)):
        raise ParamError("layers", f"DoLa's premature blocks must lie in 0..{num_layers - 2} "
                         "(the last block's output is the mature distribution)")
    if not chosen:
        raise ParamError("layers", f"this model has too few layers ({num_layers}) for the "
                         f"bucket '{layers or 'high'}'")
    return chosen


def dola_bucket(bucket: str, num_layers: int) -> tuple[int, ...]:
    half = num_layers // 2
    if bucket == "low":
        return tuple(range(0, half, 2))
    return tuple(range(half, num_layers - 1, 2))


def jensen_shannon(mature: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(N, V) and (N, K, V) logits -> (N, K) JS divergences between the softmaxes, as
    (H(m) - (H(p) + H(q)) / 2) with m = (p + q) / 2: one exponential and one logarithm per
    (N, K, V) element (xlogy is a scalar loop on the CPU: the function was 1.9x slower)."""
    p, p_log_p = _softmax_and_neg_entropy(mature)  # (N, V), (N,)
    q, q_log_q = _softmax_and_neg_entropy(candidates)  # (N, K, V), (N, K)
    m = q.add_(p.unsqueeze(1)).mul_(0.5)
    # 0 log 0 = 0: a token no distribution gives any mass (e.g. masked to -inf)
    m_log_m = torch.linalg.vecdot(m, m.clamp_min(torch.finfo(m.dtype).tiny).log())
    return 0.5 * (p_log_p.unsqueeze(1) + q_log_q) - m_log_m


def _softmax_and_neg_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(z) over the last dim, and sum p log p = sum p z - max z - log sum exp(z - max)
    (sum p = 1), with no logarithm per element. -inf logits are clamped to the lowest finite
    float, whose p is 0: their p z is 0, not NaN."""
    z = logits.float().clamp_min(torch.finfo(torch.float32).min)
    top = z.amax(-1, keepdim=True)
    p = (z - top).exp_()
    total = p.sum(-1, keepdim=True)
    p.div_(total)
    p_log_p = torch.linalg.vecdot(p, z) - (top + total.log()).squeeze(-1)
    return p, p_log_p


def premature(mature: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(N, V), (N, K, V) -> (N, V): per row the candidate most distant from the mature."""
    chosen = jensen_shannon(mature, candidates).argmax(dim=-1)  # (N,)
    return candidates[torch.arange(len(chosen), device=chosen.device), chosen]
