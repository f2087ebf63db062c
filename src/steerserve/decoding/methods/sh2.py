"""SH2, self-highlighted hesitation (Kai et al. 2024): (1 + alpha) lsm(ponder) - alpha lsm(orig).

The original lane's prefill scores the prompt; among its lowest-probability tokens a random
subset (seeded by the request's seed) become the "keys". A hesitation lane then sees the
line `Pondering: <keys>` before the prompt (after a BOS) and joins in the same step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch

from steerserve.decoding.methods.base import (
    DecodingMethod,
    LanePlanner,
    LaneView,
    Mix,
    ParamError,
    lane,
    param,
)
from steerserve.decoding.request import LaneSpec


@dataclass(frozen=True)
class SH2Params:
    alpha: float | None = param(None, doc="weight of the contrast (default 10, the code's)",
                                ge=0.0, le=100.0)
    key_num: float | None = param(None, doc="how many keys, in percent-like units of the "
                                  "prompt (default 10, the code's)", gt=0.0, le=100.0)
    mask: bool | None = param(None, doc="keep only tokens with p >= 0.1 max p under the "
                              "hesitation lane")


@dataclass(frozen=True, eq=False)
class SH2(DecodingMethod):
    name: ClassVar[str] = "sh2"
    Params: ClassVar[type] = SH2Params
    lanes: tuple[LaneSpec, ...]  # the original lane; the hesitation lane joins as position 1
    tokenizer: object
    max_len: int  # the model's context: the hesitation prompt is kept inside it
    alpha: float = 10.0
    key_num: float = 10.0
    masked: bool = False
    seed: int | None = None

    @classmethod
    def build(cls, params: SH2Params, planner: LanePlanner) -> SH2:
        info = planner.model(planner.base.model)
        shortest = ponder_prompt(info.tokenizer, planner.base.prompt_ids, [])
        if len(shortest) >= info.max_model_len:
            raise ParamError("", f"the hesitation prompt ({len(shortest)} tokens with no key) "
                             f"does not fit this model's context of {info.max_model_len}")
        return cls((planner.base,), info.tokenizer, info.max_model_len,
                   10.0 if params.alpha is None else params.alpha,
                   10.0 if params.key_num is None else params.key_num, bool(params.mask),
                   planner.seed)

    def mix(self) -> Mix:
        return Mix((lane(1, 1.0 + self.alpha), lane(0, -self.alpha)), True,
                   plausible=1 if self.masked else None, alpha=0.1)

    @property
    def late_lanes(self) -> int:
        return 1

    def prompt_logits_lanes(self, scoring: bool) -> frozenset[int]:
        return frozenset({0, 1}) if scoring else frozenset({0})  # lane 0's pick the keys

    def after_prefill(self, view: LaneView) -> tuple[LaneSpec, ...]:
        orig = self.lanes[0]
        skip = frozenset(self.tokenizer.all_special_ids)
        keys = sh2_keys(orig.prompt_ids, view.prompt_logits(0), self.key_num, skip, self.seed)
        prompt = ponder_prompt(self.tokenizer, orig.prompt_ids, keys)
        while len(prompt) >= self.max_len and keys:  # fits the context: fewer keys
            keys = keys[:-1]
            prompt = ponder_prompt(self.tokenizer, orig.prompt_ids, keys)
        return (LaneSpec(orig.model, prompt, orig.adapter, orig.steering),)


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
