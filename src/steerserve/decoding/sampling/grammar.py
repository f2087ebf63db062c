"""Grammar-constrained decoding: which tokens each constrained row may take this step.

A request's `Grammar` holds a compiled llguidance matcher made by the server (never on the
engine thread); each running request walks its own copy. Per step the engine asks every
constrained row for its allowed-token bitmask (a few microseconds a row, in Rust) and the
sampler removes the other tokens after temperature and before truncation, so greedy and
sampled rows, every decoding method's mix and every adaptive temperature compose with it.
Unconstrained rows cost nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import llguidance
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled constraint, shared by every choice of a request (and cached across them)."""

    prototype: llguidance.LLMatcher  # the compiled grammar in its start state; never advanced
    vocab_size: int  # the tokenizer's, which the bitmask covers

    def start(self) -> GrammarState:
        return GrammarState(self.prototype.deep_copy(), self.vocab_size)


class GrammarState:
    """One running request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            logger.warning("a grammar refused a sampled token: %s", self.matcher.get_error())

    @property
    def done(self) -> bool:
        """The grammar is complete (and cannot continue), or it broke."""
        return self.matcher.is_stopped() or self.matcher.is_error()


def blocked_tokens(states: list[GrammarState | None], width: int,
                   device: torch.device) -> list[torch.Tensor | None]:
    """Per row, a (width,) bool tensor of the tokens its grammar forbids now (None: no
    grammar). Tokens past a row's vocabulary are forbidden; a broken grammar allows only
    what llguidance allows after an error (its end-of-sequence tokens)."""
    constrained = [i for i, state in enumerate(states) if state is not None]
    if not constrained:
        return [None] * len(states)
    bitmask = torch.zeros(len(constrained), (width + 31) // 32, dtype=torch.int32)
    for row, index in enumerate(constrained):
        words = bitmask[row, :(states[index].vocab_size + 31) // 32]  # contiguous
        states[index].matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
    bits = torch.arange(32, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).view(len(constrained), -1)[:, :width]
    blocked = (allowed == 0).to(device)
    for row, index in enumerate(constrained):
        blocked[row, states[index].vocab_size:] = True
    rows: list[torch.Tensor | None] = [None] * len(states)
    for row, index in enumerate(constrained):
        rows[index] = blocked[row]
    return rows
