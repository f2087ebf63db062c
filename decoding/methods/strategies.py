"""Multi-lane decoding methods: which lanes a request needs and how their logits combine.

Each method reduces, per step, to one weighted sum over the request's lane logits (raw or
log-softmax), with an optional plausibility mask, which `kernels/combine.py` runs for every
request of the batch at once (formulas from the reference code, `methods.md`):

* proxy_tuning: z_base + alpha * (z_expert - z_anti)                        (raw logits)
* contrastive li2022: lsm(z_expert) - beta * lsm(z_amateur / T_a), expert-plausible set
* contrastive obrien2023: (1 + beta) z_expert - beta z_amateur, expert-plausible set
* sh2: (1 + alpha) lsm(ponder) - alpha lsm(orig), optional ponder-plausible mask
* dola: lsm(mature) - lsm(premature), the premature layer with the largest Jensen-Shannon
  divergence from the mature distribution, mature-plausible set
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from steerserve.decoding.model.hosted import LaneSpec


@dataclass(frozen=True, eq=False)
class DecodingMethod:
    """A request's method with its parameters resolved (defaults filled in by the server)."""

    name: str  # "proxy_tuning" | "contrastive" | "sh2" | "dola"
    lanes: tuple[LaneSpec, ...]  # proxy: base, expert, anti; contrastive: expert, amateur;
    #                              sh2: orig (ponder is added after its prefill); dola: mature
    alpha: float = 1.0
    beta: float = 0.5
    variant: str = "li2022"
    key_num: float = 10.0
    relative_top: float | None = None  # plausibility mask (sh2, dola); contrastive uses alpha
    layers: tuple[int, ...] = ()  # dola's candidate premature layers
    seed: int | None = None  # sh2's key sampling


@dataclass(frozen=True)
class Mix:
    """One request row of the combination: lanes (by position in the request's lane list,
    or 'early' for DoLa's premature row), weights, and the mask."""

    terms: tuple[tuple[int, float], ...]  # (lane position, weight); -1 = DoLa premature row
    log_softmax: bool
    plausible: int | None = None  # lane position whose distribution defines the plausible set
    alpha: float = 0.1


PLAIN = Mix(((0, 1.0),), log_softmax=False)


def mix_for(method: DecodingMethod | None) -> Mix:
    if method is None:
        return PLAIN
    if method.name == "proxy_tuning":
        return Mix(((0, 1.0), (1, method.alpha), (2, -method.alpha)), log_softmax=False)
    if method.name == "contrastive":
        if method.variant == "li2022":
            return Mix(((0, 1.0), (1, -method.beta)), True, plausible=0, alpha=method.alpha)
        return Mix(((0, 1.0 + method.beta), (1, -method.beta)), False, plausible=0,
                   alpha=method.alpha)
    if method.name == "sh2":
        top = method.relative_top
        return Mix(((1, 1.0 + method.alpha), (0, -method.alpha)), True,
                   plausible=1 if top else None, alpha=top or 0.1)
    if method.name == "dola":
        top = method.relative_top
        return Mix(((0, 1.0), (-1, -1.0)), True, plausible=0 if top else None, alpha=top or 0.1)
    raise ValueError(f"unknown decoding method {method.name}")


# ---- DoLa ---------------------------------------------------------------------------------


def dola_layers(bucket: str, num_layers: int) -> tuple[int, ...]:
    """DoLa's candidate buckets over block outputs: every second block of the lower or upper
    half, the final block excluded (its normed output is the mature distribution)."""
    half = num_layers // 2
    if bucket == "low":
        return tuple(range(0, half, 2))
    return tuple(range(half, num_layers - 1, 2))


def jensen_shannon(mature: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(V,) and (K, V) logits -> (K,) JS divergences between the softmaxes."""
    p = mature.float().softmax(-1).unsqueeze(0)  # (1, V)
    q = candidates.float().softmax(-1)  # (K, V)
    m = 0.5 * (p + q)
    log_m = m.clamp_min(1e-30).log()
    kl_p = (p * (p.clamp_min(1e-30).log() - log_m)).sum(-1)
    kl_q = (q * (q.clamp_min(1e-30).log() - log_m)).sum(-1)
    return 0.5 * (kl_p + kl_q)


def dola_premature(mature: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The candidate row (V,) most distant from the mature logits."""
    return candidates[int(jensen_shannon(mature, candidates).argmax())]


# ---- SH2 ------------------------------------------------------------------------------------


def sh2_keys(prompt_ids: tuple[int, ...], prompt_logits: torch.Tensor, key_num: float,
             skip_ids: frozenset[int], seed: int | None) -> list[int]:
    """Hesitation keys: among the prompt's lowest-probability tokens (as the original lane's
    prefill predicted them), a random subset, in prompt order (Kai et al.'s rule)."""
    logprobs = prompt_logits.float().log_softmax(-1)  # (P - 1, V): row i predicts token i + 1
    targets = torch.tensor(prompt_ids[1:], device=logprobs.device)
    scored = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    candidates = [(lp, i + 1) for i, lp in enumerate(scored) if prompt_ids[i + 1] not in skip_ids]
    n = len(candidates)
    if n == 0:
        return []
    lowest = sorted(candidates)[: max(int(n * 0.015 * key_num), 1)]
    chosen = random.Random(seed).sample(lowest, min(len(lowest), max(int(n * 0.01 * key_num),
                                                                      1)))
    return [prompt_ids[position] for _, position in sorted(chosen, key=lambda c: c[1])]


def ponder_prompt(tokenizer, prompt_ids: tuple[int, ...], keys: list[int]) -> tuple[int, ...]:
    """The hesitation context: a 'Pondering: <keys>' line before the prompt (after a BOS)."""
    line = tokenizer.encode(f"Pondering: {tokenizer.decode(keys).strip()}\n",
                            add_special_tokens=False)
    bos = tokenizer.bos_token_id
    head = prompt_ids[:1] if prompt_ids and bos is not None and prompt_ids[0] == bos else ()
    return (*head, *line, *prompt_ids[len(head):])


def plausible_mask(logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """(.., V) True where p >= alpha * max p (relative top), computed on logits."""
    return logits >= logits.max(dim=-1, keepdim=True).values + math.log(alpha)
