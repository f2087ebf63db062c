"""Reference rules written from the papers' code (shared/reference/methods.md), for tests."""

from __future__ import annotations

import random

import torch


def lsm(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1)


def reference_keys(prompt: list[int], prompt_logits: torch.Tensor, key_num: float,
                   skip: set[int], seed: int) -> list[int]:
    """SH2's key rule as its paper and code state it (methods.md), position by position."""
    scored = []
    for i in range(1, len(prompt)):
        if prompt[i] in skip:
            continue
        scored.append((float(lsm(prompt_logits[i - 1])[prompt[i]]), i))
    n = len(scored)
    lowest = sorted(scored)[: max(int(n * 0.015 * key_num), 1)]
    picked = random.Random(seed).sample(lowest, min(len(lowest),
                                                    max(int(n * 0.01 * key_num), 1)))
    return [prompt[i] for _, i in sorted(picked, key=lambda pair: pair[1])]


def reference_ponder(tokenizer, prompt: list[int], keys: list[int]) -> list[int]:
    """'Pondering: <keys>' on its own line before the prompt, after the BOS."""
    line = tokenizer.encode(f"Pondering: {tokenizer.decode(keys).strip()}\n",
                            add_special_tokens=False)
    assert prompt[0] == tokenizer.bos_token_id
    return prompt[:1] + line + prompt[1:]
