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
import numpy as np
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


@dataclass(frozen=True)
class GrammarMask:
    """One step's grammar constraint over a batch."""

    blocked: torch.Tensor  # (B, V) bool: tokens a row's grammar forbids (none for free rows)
    constrained: torch.Tensor  # (B,) bool: rows with a grammar

    def rows(self, index: list[int]) -> GrammarMask:
        return GrammarMask(self.blocked[index], self.constrained[index])

    def apply_(self, logits: torch.Tensor) -> None:
        """-inf on every forbidden token, in one pass. A row whose allowed tokens were all
        -inf already (a method's plausibility cut) draws uniformly among them instead, so it
        always has a token to take."""
        logits.masked_fill_(self.blocked, float("-inf"))
        empty = torch.isneginf(logits.amax(dim=-1)) & self.constrained
        if bool(empty.any()):
            logits[empty] = torch.zeros_like(logits[empty]).masked_fill(self.blocked[empty],
                                                                        float("-inf"))


def grammar_mask(states: list[GrammarState | None], width: int,
                 device: torch.device) -> GrammarMask | None:
    """The batch's mask (None when no row has a grammar): each constrained row's allowed-token
    bitmask from llguidance, unpacked at once; tokens past a row's vocabulary are forbidden."""
    if all(state is None for state in states):
        return None
    words = (width + 31) // 32
    bitmask = torch.full((len(states), words), -1, dtype=torch.int32)  # free rows: all allowed
    for row, state in enumerate(states):
        if state is not None:
            bitmask[row] = 0
            own = bitmask[row, :(state.vocab_size + 31) // 32]  # contiguous
            state.matcher.unsafe_compute_mask_ptr(own.data_ptr(), own.numel() * 4)
            if state.matcher.is_error():  # it broke (a parser limit): it ends at this token
                logger.warning("a grammar stopped: %s", state.matcher.get_error()[:200])
                own.fill_(-1)
    # Bit i of word j is token 32 j + i: little-endian bytes, each unpacked low bit first.
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    allowed = torch.from_numpy(bits).view(torch.bool)[:, :width]
    constrained = torch.tensor([state is not None for state in states])
    return GrammarMask((~allowed).to(device), constrained.to(device))
