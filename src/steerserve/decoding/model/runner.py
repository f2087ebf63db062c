"""Batched forwards over the slot cache: prefill for new lanes, decode for running ones.

We call the transformers decoder stack ourselves (own loop, own cache, explicit per-row
positions and a 4D boolean mask) and apply the LM head only where logits are needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from steerserve.adapters.lora.bank import LoraBank
from steerserve.adapters.steering.plan import SteeringPlan
from steerserve.decoding.model.attention_split import AttentionSplit, split_attention
from steerserve.decoding.model.capture import Capture
from steerserve.decoding.model.compiled import CompiledDecode, not_compilable
from steerserve.decoding.model.families import unsupported
from steerserve.decoding.model.fused import FusedDecoder
from steerserve.decoding.model.hf_modules import ModuleDecoder
from steerserve.decoding.model.kv_cache import SlotKVCache, cache_shape_for
from steerserve.decoding.model.loader import LoadedModel
from steerserve.decoding.model.packed import Projection
from steerserve.decoding.model.step_inputs import StepInputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillResult:
    last_logits: torch.Tensor  # (B, V) float32: next-token logits after each prompt
    prompt_logits: list[torch.Tensor | None]  # per row (len-1, V) when prompt logprobs asked
    last_hidden: torch.Tensor  # (B, C): final (normed) hidden state at each last position


@dataclass(frozen=True)
class DecodeResult:
    logits: torch.Tensor  # (B, V) float32
    hidden: torch.Tensor  # (B, C): the final (normed) hidden state the logits come from


def prefill_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, 1, T, T) causal mask that also hides each row's right padding."""
    positions = torch.arange(width, device=lengths.device)
    causal = positions.unsqueeze(1) >= positions.unsqueeze(0)  # (T, T)
    valid = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    return (causal.unsqueeze(0) & valid.unsqueeze(1)).unsqueeze(1)


def offset_prefill_mask(starts: torch.Tensor, lengths: torch.Tensor, width: int,
                        kv_len: int) -> torch.Tensor:
    """(B, 1, T, kv_len) for rows whose T new tokens follow a reused prefix of starts[b]
    tokens: token t of row b sees keys 0..starts[b] + t, never the row's padding."""
    keys = torch.arange(kv_len, device=starts.device).view(1, 1, kv_len)  # (1, 1, K)
    queries = torch.arange(width, device=starts.device).view(1, width, 1)  # (1, T, 1)
    start = starts.view(-1, 1, 1)
    end = (starts + lengths).view(-1, 1, 1)
    return ((keys <= start + queries) & (keys < end)).unsqueeze(1)


def decode_mask(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
    """(B, 1, 1, kv_len): row b sees keys 0..positions[b]."""
    keys = torch.arange(kv_len, device=positions.device)
    return (keys.unsqueeze(0) <= positions.unsqueeze(1)).unsqueeze(1).unsqueeze(1)


def choose_forward(model: torch.nn.Module, requested: str) -> str:
    """'fused' (our own forward, decoding/model/families.py) or 'hf' (the Hugging Face
    modules), logged."""
    reason = unsupported(model)
    if requested == "fused" and reason is not None:
        raise ValueError(f"--forward fused: {reason}")
    chosen = "hf" if requested == "hf" or reason is not None else "fused"
    why = {"hf": f"{reason or 'asked for'}; the slower path", "fused": "own forward"}[chosen]
    logger.info("forward for %s: %s (%s)", model.config.model_type, chosen, why)
    return chosen


class ModelRunner:
    def __init__(self, loaded: LoadedModel, num_slots: int,
                 lora_bank: LoraBank | None = None, forward: str = "auto",
                 extra_slots: int = 0, packed_weights: bool = True,
                 compile_decode: bool = False) -> None:
        """`num_slots` for lanes, then `extra_slots` more for the prefix cache;
        `packed_weights`: our own forward and the LM head run on oneDNN-packed copies;
        `compile_decode`: decode batches run one compiled graph, adapters and early-exit
        captures included, where their steering only adds vectors (model/compiled.py)."""
        self.loaded = loaded
        self.model = loaded.model
        self.decoder = getattr(self.model, self.model.base_model_prefix)
        self.lm_head = self.model.get_output_embeddings()
        self.device = loaded.device
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)
        self.lane_slots = num_slots
        shape = cache_shape_for(self.model.config, num_slots + extra_slots, loaded.max_model_len)
        self.cache = SlotKVCache(shape, loaded.dtype, loaded.device)
        self.inputs = StepInputs(num_slots + extra_slots, loaded.device)
        self.lora_bank = lora_bank
        self.forward_kind = choose_forward(self.model, forward)
        if self.forward_kind == "fused":
            self.forward = FusedDecoder(self.model, lora_bank, packed_weights)
        else:
            self.forward = ModuleDecoder(self.model, lora_bank)
        head = self.lm_head
        self.head = Projection(head.weight, head.bias, packed_weights)
        self.compiled = self._compiled_decode() if compile_decode else None
        self.model._steerserve_taken = True  # tests refuse it as an untouched oracle

    def _compiled_decode(self) -> CompiledDecode | None:
        reason = ("the Hugging Face modules run" if self.forward_kind != "fused"
                  else "it needs --max-num-seqs 2 or more" if self.lane_slots < 2
                  else not_compilable(self.forward, self.model))
        if reason is not None:
            logger.warning("--compile-decode: decode stays eager (%s)", reason)
            return None
        compiled = CompiledDecode(self.forward, self.lm_head, self.cache, self.lane_slots,
                                  self.lora_bank)
        try:
            compiled.warm_up()
        except Exception as exc:  # e.g. no C++ compiler for inductor: serve eager, say why
            logger.warning("--compile-decode: decode stays eager (compiling failed: %s)",
                           str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
        return compiled

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) hidden -> (N, V) float32 logits."""
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def early_exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) block outputs -> (N, V): the final norm and LM head on an earlier layer."""
        return self.logits(self.decoder.norm(hidden.to(self.lm_head.weight.dtype)))

    def _run(self, input_ids, position_ids, mask, window, lora_slots,
             steering: SteeringPlan | None, capture: Capture | None,
             lora_rows: torch.Tensor | None = None) -> torch.Tensor:
        if self.lora_bank is None or lora_slots is None:
            return self.forward(input_ids, position_ids, mask, window, steering, capture)
        with self.lora_bank.activate(lora_slots, input_ids.shape[1], lora_rows):
            return self.forward(input_ids, position_ids, mask, window, steering, capture)

    @torch.inference_mode()
    def decode(self, first_slot: int, tokens: list[int], positions: list[int],
               lora_slots: list[int] | None = None,
               steering: SteeringPlan | None = None,
               capture: Capture | None = None) -> DecodeResult:
        """One new token per row at its own position; the index tensors are views of the
        runner's preallocated step inputs (decoding/model/step_inputs.py)."""
        rows = self.inputs.decode(first_slot, tokens, positions, lora_slots)
        split = self._split(positions, rows.kv_len)
        if self.compiled is not None:
            compiled = self.compiled(rows.tokens, rows.positions, first_slot, rows.kv_len,
                                     split, steering, lora_slots, capture)
            if compiled is not None:
                logits, hidden, blocks = compiled
                for layer in capture.layers if capture is not None else ():
                    capture.read(layer, blocks[layer + 1].unsqueeze(1))  # EMBEDDINGS is -1
                return DecodeResult(logits, hidden)
        window = self.cache.for_decode(rows.slots, first_slot, rows.positions, split.shared_len,
                                       split.alone)
        hidden = self._run(rows.tokens.unsqueeze(1), rows.positions.unsqueeze(1),
                           decode_mask(rows.positions, split.shared_len), window, lora_slots,
                           steering, capture, rows.adapters)
        return DecodeResult(self.logits(hidden[:, 0]), hidden[:, 0])

    def _split(self, positions: list[int], kv_len: int) -> AttentionSplit:
        """Which rows attend alone: a few in our own forward, none in the Hugging Face
        modules (the compiled graph reads one window, or leaves a batch to the eager
        forward)."""
        if self.forward_kind != "fused":
            return AttentionSplit(kv_len)
        return split_attention([position + 1 for position in positions])

    @torch.inference_mode()
    def prefill(self, first_slot: int, prompts: list[list[int]], want_prompt_logits: list[bool],
                lora_slots: list[int] | None = None, steering: SteeringPlan | None = None,
                capture: Capture | None = None,
                starts: list[int] | None = None) -> PrefillResult:
        """Right-padded prompts in consecutive slots, from position 0, or each from its
        starts[b]: the tokens after a prefix whose keys and values are already in the slot."""
        ids, lengths, positions, mask = self._padded(prompts)
        if starts is None or not any(starts):
            window = self.cache.for_prefill(first_slot, len(prompts), 0, ids.shape[1])
        else:
            offset = torch.tensor(starts, device=self.device)
            positions = positions + offset.unsqueeze(1)  # (B, T)
            kv_len = int((offset + lengths).max())
            # A short row's padding may run past the cache: it writes at the last position
            grid = positions.clamp(max=self.cache.shape.max_len - 1)
            window = self.cache.for_rows_at(first_slot, grid, kv_len)
            mask = offset_prefill_mask(offset, lengths, ids.shape[1], kv_len)
        hidden = self._run(ids, positions, mask, window, lora_slots, steering,
                           capture)  # (B, T, C)
        rows = torch.arange(len(prompts), device=self.device)
        last_hidden = hidden[rows, lengths - 1]
        last = self.logits(last_hidden)
        prompt_logits = [
            self.logits(hidden[row, : len(prompts[row]) - 1]) if wanted else None
            for row, wanted in enumerate(want_prompt_logits)
        ]
        return PrefillResult(last, prompt_logits, last_hidden)

    @torch.inference_mode()
    def capture(self, prompts: list[list[int]], capture: Capture) -> None:
        """Forward prompts without the cache, filling `capture.found` (vector extraction)."""
        ids, _, positions, mask = self._padded(prompts)
        self.forward(ids, positions, mask, None, None, capture)

    def _padded(self, prompts: list[list[int]]):
        """Right-padded ids (B, T), lengths (B,), positions (B, T) and the 4D mask."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
        positions = torch.arange(width, device=self.device).expand(len(prompts), width)
        return ids, lengths, positions, prefill_mask(lengths, width)

    def move_slot(self, source: int, target: int, length: int) -> None:
        self.cache.move_slot(source, target, length)
