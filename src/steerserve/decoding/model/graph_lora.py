"""The LoRA adapters of a decode batch as inputs of the compiled graph (model/compiled.py).

The graph takes, per projection kind, every layer's A and B of the slots the batch uses,
gathered into one tensor ((layers, P, in) and (layers, P, out), P = slots used x their
largest rank), and a (rows, P) mask holding each row's slot scaling over its own slot's
block: the dense path of adapters/lora/bank.py, `((x A^T) * mask) B` added to each
projection's output, with the adapters as data rather than as ops, so one graph serves any
set of adapters. A plain batch passes zeros of P = 2 (sizes 0 and 1 would be compiled as
constants). Projections no resident adapter targets get zeros.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from steerserve.adapters.lora.bank import LoraBank

# (attribute of LoraInputs, projection under the layer's prefix)
A_KINDS = (("a_q", "self_attn.q_proj"), ("a_k", "self_attn.k_proj"),
           ("a_v", "self_attn.v_proj"), ("a_o", "self_attn.o_proj"),
           ("a_gate", "mlp.gate_proj"), ("a_up", "mlp.up_proj"), ("a_down", "mlp.down_proj"))
B_KINDS = tuple((f"b{name[1:]}", key) for name, key in A_KINDS)
MIN_WIDTH = 2  # the gathered width is symbolic in the graph: 0 and 1 would be constants
CACHED_SETS = 4  # recent adapter sets whose gathered weights are kept


class LoraInputs(NamedTuple):
    """A_kind (layers, P, in), B_kind (layers, P, out), mask (rows, P)."""

    mask: torch.Tensor
    a_q: torch.Tensor
    a_k: torch.Tensor
    a_v: torch.Tensor
    a_o: torch.Tensor
    a_gate: torch.Tensor
    a_up: torch.Tensor
    a_down: torch.Tensor
    b_q: torch.Tensor
    b_k: torch.Tensor
    b_v: torch.Tensor
    b_o: torch.Tensor
    b_gate: torch.Tensor
    b_up: torch.Tensor
    b_down: torch.Tensor


def delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, in), a (P, in), b (P, out), mask (B, P) -> each row's adapter delta (B, out)."""
    return ((x @ a.T) * mask) @ b


class GraphLora:
    """Builds a batch's LoraInputs from the bank: the gathered weights once per adapter set
    (the bank's `version` says when a slot was rewritten), the mask each step."""

    def __init__(self, bank: LoraBank, layer_prefixes: list[str]) -> None:
        self.bank, self.prefixes = bank, layer_prefixes
        self._weights: dict[tuple, dict[str, torch.Tensor]] = {}

    def inputs(self, row_slots: list[int], graph_rows: int) -> LoraInputs:
        """`row_slots`: each row's slot (-1: none); rows past them (a dummy row) get none."""
        used = tuple(sorted({slot for slot in row_slots if slot >= 0}))
        rank = max([self.bank.slot_rank[slot] for slot in used] + [1])
        if len(used) * rank < MIN_WIDTH:
            rank = MIN_WIDTH  # the bank's stacks are zero past a slot's rank
        weights = self._gathered(used, rank)
        return LoraInputs(self._mask(row_slots, graph_rows, used, rank), **weights)

    def _mask(self, row_slots: list[int], graph_rows: int, used: tuple[int, ...],
              rank: int) -> torch.Tensor:
        bank = self.bank
        if not used:
            return torch.zeros(graph_rows, rank, dtype=bank.dtype, device=bank.device)
        slots = torch.full((graph_rows,), -1, dtype=torch.long, device=bank.device)
        slots[:len(row_slots)] = torch.tensor(row_slots, device=bank.device)
        return bank.row_mask(slots, used, rank)

    def _gathered(self, used: tuple[int, ...], rank: int) -> dict[str, torch.Tensor]:
        key = (self.bank.version, used, rank)
        weights = self._weights.get(key)
        if weights is None:
            if len(self._weights) >= CACHED_SETS:
                self._weights.pop(next(iter(self._weights)))
            weights = self._weights[key] = self._gather(used, rank)
        return weights

    def _gather(self, used: tuple[int, ...], rank: int) -> dict[str, torch.Tensor]:
        """Each kind's (layers, P, in) A and (layers, P, out) B: slot blocks of `rank` rows,
        zero past a slot's own rank (or the bank's largest)."""
        bank, slots = self.bank, list(used)
        blocks, kept = max(len(used), 1), min(rank, bank.max_rank)
        weights = {}
        for (a_name, module), (b_name, _) in zip(A_KINDS, B_KINDS, strict=True):
            keys = [f"{prefix}.{module}" for prefix in self.prefixes]
            linear = bank.linears[keys[0]]
            a = torch.zeros(len(keys), blocks, rank, linear.in_features, dtype=bank.dtype,
                            device=bank.device)
            b = torch.zeros(len(keys), blocks, rank, linear.out_features, dtype=bank.dtype,
                            device=bank.device)
            for layer, key in enumerate(keys):
                if key in bank.lora_a and slots:
                    a[layer, :, :kept] = bank.lora_a[key][slots, :kept]
                    b[layer, :, :kept] = bank.lora_b[key][slots, :, :kept].transpose(1, 2)
            weights[a_name], weights[b_name] = a.flatten(1, 2), b.flatten(1, 2)
        return weights
