"""Resident LoRA adapters for one base model: stacked slot weights and per-forward routing.

Every projection inside the decoder blocks is a target, keyed by its module path. Adapter
weights live in numbered slots, per target: A (S, R, in), B (S, out, R), zero-padded to the
maximum rank R, with a per-slot scaling. Before a forward the runner activates a `LoraBatch`
saying which slot each row uses (-1: none); the forward (ours in decoding/model/fused.py, or
the wrapped modules of decoding/model/hf_modules.py) adds `scale[s] * B[s] (A[s] x)` for
each row at each projection. No base weight is ever modified.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from steerserve.kernels.lora.ops import (
    apply_lora_bgmv,
    apply_lora_sgmv,
    build_segments,
)
from steerserve.kernels.lora.ops import (
    use_triton as kernels_use_triton,
)


@dataclass(frozen=True)
class LoraBatch:
    """Per-forward routing: one slot per token (rows repeated over their positions)."""

    token_slots: torch.Tensor  # (N,) int64, -1 = no adapter
    used: tuple[int, ...]  # distinct slots in use, sorted
    rank: int  # largest rank among them: the dense path skips the zero padding beyond it
    mask: torch.Tensor  # (N, len(used) * rank): scaling where the token uses that block, else 0
    decode: bool


class LoraBank:
    def __init__(self, model: nn.Module, num_slots: int, max_rank: int,
                 use_triton: bool | None = None) -> None:
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.num_slots, self.max_rank = num_slots, max_rank
        self.linears = _eligible_linears(model)
        self.lora_a: dict[str, torch.Tensor] = {}  # key -> (S, R, in)
        self.lora_b: dict[str, torch.Tensor] = {}  # key -> (S, out, R)
        self.scaling = torch.zeros(num_slots, dtype=torch.float32, device=self.device)
        self.slot_rank = [0] * num_slots
        self.active: LoraBatch | None = None
        self.version = 0  # counts slot writes: what caches of slot weights key on
        self._dense_cache: dict[tuple, tuple] = {}
        if use_triton is None:  # the process's one choice for this device (kernels.dispatch)
            use_triton = kernels_use_triton(self.device)
        self.use_triton = use_triton

    # ---- slot weights --------------------------------------------------------------------
    def write_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   scaling: float) -> None:
        """Load an adapter into a slot (other modules of that slot are zeroed)."""
        for key in weights:
            if key not in self.linears:
                raise ValueError(f"module '{key}' is not a LoRA-eligible linear layer")
            self._allocate(key)
        for key in self.lora_a:
            self.lora_a[key][slot].zero_()
            self.lora_b[key][slot].zero_()
        for key, (a, b) in weights.items():
            rank = a.shape[0]
            self.lora_a[key][slot, :rank] = a.to(self.dtype)
            self.lora_b[key][slot, :, :rank] = b.to(self.dtype)
        self.scaling[slot] = scaling
        self.slot_rank[slot] = max((a.shape[0] for a, _ in weights.values()), default=0)
        self._dense_cache.clear()
        self.version += 1

    def _allocate(self, key: str) -> None:
        if key in self.lora_a:
            return
        linear = self.linears[key]
        shape_a = (self.num_slots, self.max_rank, linear.in_features)
        shape_b = (self.num_slots, linear.out_features, self.max_rank)
        self.lora_a[key] = torch.zeros(shape_a, dtype=self.dtype, device=self.device)
        self.lora_b[key] = torch.zeros(shape_b, dtype=self.dtype, device=self.device)

    # ---- per forward ---------------------------------------------------------------------
    @contextmanager
    def activate(self, row_slots: list[int], tokens_per_row: int,
                 rows: torch.Tensor | None = None) -> Iterator[None]:
        """`rows`: row_slots as a tensor already on the device, when the caller has one."""
        if all(s < 0 for s in row_slots):
            yield
            return
        self.active = self._batch(row_slots, tokens_per_row, rows)
        try:
            yield
        finally:
            self.active = None

    def _batch(self, row_slots: list[int], tokens_per_row: int,
               rows: torch.Tensor | None) -> LoraBatch:
        if rows is None:
            rows = torch.tensor(row_slots, dtype=torch.long, device=self.device)
        token_slots = rows if tokens_per_row == 1 else rows.repeat_interleave(tokens_per_row)
        used = tuple(sorted({s for s in row_slots if s >= 0}))
        rank = max(self.slot_rank[s] for s in used)
        return LoraBatch(token_slots, used, rank, self.row_mask(token_slots, used, rank),
                         tokens_per_row == 1)

    def row_mask(self, token_slots: torch.Tensor, used: tuple[int, ...],
                 rank: int) -> torch.Tensor:
        """(N, U * rank): each token's slot scaling over its slot's block of the used slots'
        stacked ranks, 0 elsewhere (and everywhere for a token with no adapter, -1)."""
        block = (token_slots.unsqueeze(1) == torch.tensor(used, device=self.device))  # (N, U)
        scale = self.scaling[list(used)].to(self.dtype)  # (U,)
        return (block.to(self.dtype) * scale).repeat_interleave(rank, dim=1)

    def apply(self, key: str, x: torch.Tensor, y: torch.Tensor, batch: LoraBatch) -> None:
        """y += scale * B (A x) per token; x: (N, in), y: (N, out) a view into the output."""
        if self.use_triton:
            self._apply_kernels(key, x, y, batch)
            return
        # CPU: one dense matmul over all slots in use beats one small matmul per slot, whose
        # cost is dominated by per-op overhead at these sizes.
        a_used, b_used = self._dense(key, batch.used, batch.rank)  # (U*r, in), (U*r, out)
        y.addmm_((x @ a_used.T).mul_(batch.mask), b_used)  # in place: 12% less per call

    def apply_fused(self, keys: tuple[str, ...], widths: tuple[int, ...], x: torch.Tensor,
                    y: torch.Tensor, batch: LoraBatch) -> None:
        """Dense path for projections sharing their input whose outputs are one tensor
        y = [y_0 | y_1 | ...] (widths): one product with the stacked A's, then one product
        per adapted projection into its part of y (a block-diagonal B in one product read
        its zero blocks too: 1.2-1.5x slower at 32-64 rows, docs/benchmarks.md)."""
        present = [key for key in keys if key in self.lora_a]
        if not present:
            return
        a_used, parts = self._dense_fused(keys, widths, batch.used, batch.rank)
        shrunk = (x @ a_used.T).view(x.shape[0], len(parts), -1)  # (N, K, U * r)
        shrunk.mul_(batch.mask.unsqueeze(1))
        for i, (offset, b_used) in enumerate(parts):
            y[:, offset:offset + b_used.shape[1]].addmm_(shrunk[:, i], b_used)

    def _dense_fused(self, keys: tuple[str, ...], widths: tuple[int, ...],
                     used: tuple[int, ...], rank: int
                     ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
        """The adapted projections' A's stacked (K * U * r, in), and each one's output offset
        and (U * r, out) B."""
        cached = self._dense_cache.get((keys, used))
        if cached is None:
            offsets = [sum(widths[:i]) for i in range(len(keys))]
            present = [(key, offset) for key, offset in zip(keys, offsets, strict=True)
                       if key in self.lora_a]
            dense = [self._dense(key, used, rank) for key, _ in present]
            a = torch.cat([part_a for part_a, _ in dense])
            parts = [(offset, part_b) for (_, offset), (_, part_b) in
                     zip(present, dense, strict=True)]
            cached = self._dense_cache[(keys, used)] = (a, parts)
        return cached

    def _apply_kernels(self, key: str, x: torch.Tensor, y: torch.Tensor,
                       batch: LoraBatch) -> None:
        a, b = self.lora_a[key], self.lora_b[key]
        if batch.decode:
            apply_lora_bgmv(x, a, b, batch.token_slots, self.scaling, y)
        else:
            segments = build_segments(batch.token_slots)
            apply_lora_sgmv(x, a, b, segments.starts, segments.adapter, self.scaling, y,
                            segments.max_len)

    def _dense(self, key: str, used: tuple[int, ...],
               rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._dense_cache.get((key, used))
        if cached is None:
            if len(self._dense_cache) > 4 * len(self.lora_a):
                self._dense_cache.clear()  # keep only recent slot sets
            slots = list(used)
            a = self.lora_a[key][slots, :rank].reshape(-1, self.lora_a[key].shape[-1])
            b = self.lora_b[key][slots, :, :rank].transpose(1, 2)
            cached = (a.contiguous(), b.reshape(-1, self.lora_b[key].shape[1]).contiguous())
            self._dense_cache[(key, used)] = cached
        return cached


def _eligible_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks (attention and MLP projections)."""
    decoder = getattr(model, model.base_model_prefix)
    prefix = model.base_model_prefix
    return {f"{prefix}.{name}": module for name, module in decoder.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("layers.")}
