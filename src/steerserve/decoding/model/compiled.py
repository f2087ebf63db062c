"""The decode forward as one graph compiled by inductor (`--compile-decode`).

A decode step of our own forward makes about 170 ATen calls a layer, most of them views and
slices around some 25 arithmetic ops, each dispatched from Python: at SmolLM2's size that
dispatch is a third of a step on two CPU cores (docs/benchmarks.md). Compiled once with the
weights frozen (inductor packs them for oneDNN itself and fuses the elementwise ops between
the products into C++ loops), the same step is one call.

It serves decode batches whose steering only adds vectors to the residual stream (control
vectors, the common case), with or without LoRA adapters and block-output captures (DoLa's
early exits): the arithmetic of FusedDecoder's path, restated as one traceable function over
the slot cache, with that steering as one (layers, rows, width) tensor added to each block's
output (zeros for unsteered rows, whose outputs are then exactly the unsteered ones), the
adapters as gathered weights and a per-row mask (model/graph_lora.py), and every block's
output returned for a capture to read. Every other batch (other steering edits, a capture of
the heads' outputs) runs eager. The graph is compiled once, at start, for any batch of two or
more rows, any key length and any set of adapters; one row runs it beside a dummy row (see
`_padded`), so a row's arithmetic is the same at every batch size. After start it may never
recompile (`fail_on_recompile`): a call that would runs eager instead, logged, rather than
stalling the engine for a compile. Its logits match the eager forward's to float rounding,
not bit for bit (tests/test_compiled_decode.py).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config
from torch.fx.experimental import _config as shape_config

from steerserve.adapters.lora.bank import LoraBank
from steerserve.adapters.steering.plan import SteeringPlan, additive_residual
from steerserve.adapters.steering.spec import SteerTarget
from steerserve.decoding.model.attention_split import AttentionSplit
from steerserve.decoding.model.capture import Capture
from steerserve.decoding.model.families import FAMILIES, rms_norm
from steerserve.decoding.model.fused import (
    FusedDecoder,
    FusedLayer,
    grouped_decode,
    rotate_half,
)
from steerserve.decoding.model.graph_lora import GraphLora, LoraInputs, delta
from steerserve.decoding.model.kv_cache import SlotKVCache

logger = logging.getLogger(__name__)

# Weights frozen into the graph; the wrapper that calls its kernels in C++ rather than Python
# (about 4 ms a step less on two cores, docs/benchmarks.md), compiled apart from the kernels:
# as one translation unit it took 8 minutes a start, apart about as long as without it.
GRAPH_CONFIG = {"freezing": True, "cpp_wrapper": True, "cpp_wrapper_build_separate": True}

# Taking a batch's few long rows alone inside the graph as well (model/attention_split.py)
# cost every step: a fixed two rows alone compiled in twice the time (255 s against 134)
# and stepped 20% slower at one row. So the graph reads one window over its longest row, and
# a batch leaves it for the eager forward, which attends those rows alone, where that reads
# enough fewer keys to pay for the eager step: 26 / 33 / 42 / 86 ms slower than the graph at
# 8 / 16 / 32 / 64 rows, against about 6.4 us a key row (30 layers) on two cores
# (docs/benchmarks.md).
def keys_worth_leaving(rows: int) -> int:
    return 4096 + 128 * rows


RECOMPILE = "Detected recompile"  # how dynamo's fail_on_recompile stance raises (RuntimeError)


def _frozen(tensor: torch.Tensor | None) -> torch.nn.Parameter | None:
    """The same storage as a parameter, which inductor's freezing folds in as a constant."""
    return None if tensor is None else torch.nn.Parameter(tensor.detach(), requires_grad=False)


def not_compilable(decoder: FusedDecoder, model: torch.nn.Module) -> str | None:
    """Why this model's decode has no compiled graph (None: it can have one)."""
    config = model.config
    if FAMILIES[config.model_type].offset_norms:
        return f"{config.model_type}'s norms and embedding scale are not in the graph"
    if getattr(config, "final_logit_softcapping", None):
        return "final logit soft-capping is not in the graph"
    if len({layer.rotary for layer in decoder.layers}) > 1 or any(
            layer.softcap or layer.window or layer.q_norm is not None
            for layer in decoder.layers):
        return ("soft-capped, sliding-window or per-layer rotary attention and per-head "
                "query/key norms are not in the graph")
    return None


class _Layer(torch.nn.Module):
    def __init__(self, layer: FusedLayer) -> None:
        super().__init__()
        self.attention_norm, self.mlp_norm = _frozen(layer.attention_norm), _frozen(layer.mlp_norm)
        self.qkv, self.qkv_bias = _frozen(layer.qkv.weight), _frozen(layer.qkv.bias)
        self.o, self.o_bias = _frozen(layer.o.weight), _frozen(layer.o.bias)
        self.gate_up, self.gate_up_bias = _frozen(layer.gate_up.weight), _frozen(layer.gate_up.bias)
        self.down, self.down_bias = _frozen(layer.down.weight), _frozen(layer.down.bias)
        self.act, self.scale = layer.act, layer.scale


class _LayerLora:
    """One layer's view of the batch's LoraInputs: a projection's adapter deltas."""

    def __init__(self, lora: LoraInputs, index: int) -> None:
        self.lora, self.index = lora, index

    def __call__(self, x: torch.Tensor, projection: str) -> torch.Tensor:
        return delta(x, getattr(self.lora, f"a_{projection}")[self.index],
                     getattr(self.lora, f"b_{projection}")[self.index], self.lora.mask)


class DecodeGraph(torch.nn.Module):
    """(B,) tokens at (B,) positions in slots first_slot.., (layers, B, C) fp32 added to the
    block outputs, the batch's adapters (or None: a server without LoRA) -> (B, V) fp32
    logits, the (B, C) normed hidden states and the (layers + 1, B, C) block outputs after
    the embeddings; writes each row's keys and values into the cache."""

    def __init__(self, decoder: FusedDecoder, head: torch.nn.Module, max_len: int) -> None:
        super().__init__()
        self.embed = _frozen(decoder.embed.weight)
        self.norm = _frozen(decoder.norm.weight)
        self.head, self.head_bias = _frozen(head.weight), _frozen(head.bias)
        self.layers = torch.nn.ModuleList(_Layer(layer) for layer in decoder.layers)
        self.heads, self.kv_heads, self.head_dim = decoder.heads, decoder.kv_heads, decoder.head_dim
        self.eps = decoder.eps
        # The rotary module's tables for every position: it computes each position alone
        # (an outer product), so a row of the table is what it returns for that position
        positions = torch.arange(max_len, device=self.embed.device).unsqueeze(0)
        cos, sin = decoder.rotation(self.embed[:1].unsqueeze(0), positions,
                                    decoder.layers[0].rotary)  # (1, L, 1, D)
        self.register_buffer("cos", cos[0], persistent=False)  # (L, 1, D)
        self.register_buffer("sin", sin[0], persistent=False)
        self.register_buffer("key_positions", torch.arange(max_len, device=self.embed.device),
                             persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, first_slot: int,
                kv_len: int, steering: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor], lora: LoraInputs | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = tokens.shape[0]
        x = F.embedding(tokens, self.embed)  # (B, C)
        blocks = [x]
        cos, sin = self.cos[positions], self.sin[positions]  # (B, 1, D)
        seen = self.key_positions[:kv_len].unsqueeze(0) <= positions.unsqueeze(1)  # (B, K)
        additive = torch.zeros(seen.shape, dtype=x.dtype, device=x.device)
        additive = additive.masked_fill(~seen, float("-inf"))
        group = self.heads // self.kv_heads
        additive = additive.view(batch, 1, 1, kv_len).expand(batch, self.kv_heads, group, kv_len)
        additive = additive.reshape(batch * self.kv_heads, group, kv_len)
        slots = self.key_positions[first_slot:first_slot + batch]  # the same arange
        for index, (layer, cached_keys, cached_values) in enumerate(
                zip(self.layers, keys, values, strict=True)):
            adapters = None if lora is None else _LayerLora(lora, index)
            x = x + self._attention(layer, x, cos, sin, additive, slots, positions,
                                    cached_keys, cached_values, first_slot, kv_len, adapters)
            x = x + self._mlp(layer, x, adapters)
            # the steering kernels' ADD: in fp32, and never inf or NaN (edits.keep_finite)
            x = torch.nan_to_num(x.float() + steering[index], nan=0.0).to(x.dtype)
            blocks.append(x)
        hidden = rms_norm(x, self.norm, self.eps)
        logits = F.linear(hidden, self.head, self.head_bias).float()
        return logits, hidden, torch.stack(blocks)

    def _attention(self, layer: _Layer, x, cos, sin, additive, slots, positions,
                   cached_keys, cached_values, first_slot: int, kv_len: int,
                   adapters: _LayerLora | None) -> torch.Tensor:
        batch = x.shape[0]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        h = rms_norm(x, layer.attention_norm, self.eps)
        qkv = F.linear(h, layer.qkv, layer.qkv_bias)
        if adapters is not None:
            qkv = qkv + torch.cat([adapters(h, "q"), adapters(h, "k"), adapters(h, "v")], -1)
        qk = qkv[:, :(heads + kv_heads) * dim].view(batch, heads + kv_heads, dim)
        v = qkv[:, (heads + kv_heads) * dim:].view(batch, kv_heads, dim)
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, :heads], qk[:, heads:]
        cached_keys[slots, :, positions] = k
        cached_values[slots, :, positions] = v
        out = grouped_decode(q.unsqueeze(2),
                             cached_keys.narrow(0, first_slot, batch)[:, :, :kv_len],
                             cached_values.narrow(0, first_slot, batch)[:, :, :kv_len],
                             additive, layer.scale)  # (B, H, 1, D)
        out = out.reshape(batch, heads * dim)
        o = F.linear(out, layer.o, layer.o_bias)
        return o if adapters is None else o + adapters(out, "o")

    def _mlp(self, layer: _Layer, x: torch.Tensor, adapters: _LayerLora | None
             ) -> torch.Tensor:
        h = rms_norm(x, layer.mlp_norm, self.eps)
        gate_up = F.linear(h, layer.gate_up, layer.gate_up_bias)
        gate, up = gate_up.chunk(2, dim=-1)
        if adapters is not None:
            gate, up = gate + adapters(h, "gate"), up + adapters(h, "up")
        inner = layer.act(gate) * up
        down = F.linear(inner, layer.down, layer.down_bias)
        return down if adapters is None else down + adapters(inner, "down")


class CompiledDecode:
    """The compiled graph and when to use it; built by the runner with `--compile-decode`."""

    def __init__(self, decoder: FusedDecoder, head: torch.nn.Module, cache: SlotKVCache,
                 lane_slots: int, lora_bank: LoraBank | None = None) -> None:
        """`lane_slots`: the cache's first slots, the lanes' (the prefix cache's follow);
        with a `lora_bank` the graph takes every batch's adapters (a plain batch: zeros)."""
        self.cache, self.lane_slots = cache, lane_slots
        self.graph = DecodeGraph(decoder, head, cache.shape.max_len).eval()
        self.lora = None if lora_bank is None else GraphLora(
            lora_bank, [layer.prefix for layer in decoder.layers])
        for cached in (*cache.keys, *cache.values):  # fixed buffers: no symbolic sizes
            torch._dynamo.mark_static(cached)
        self.compiled = torch.compile(self.graph, dynamic=True, fullgraph=True)
        self.eager_reasons: set[str] = set()  # why batches left the graph (each logged once)
        self.steps = 0  # decode forwards it ran
        self._width = decoder.embed.weight.shape[1]
        # The graph's steering input: zeros, or a batch's additive steering copied into the
        # second buffer. Both made here, outside inference mode, as the graph was traced.
        size = cache.shape.num_layers * lane_slots * self._width
        self._zeros = torch.zeros(size, device=self.graph.embed.device)
        self._steered = torch.zeros(size, device=self.graph.embed.device)
        self._steering: tuple[SteeringPlan | None, torch.Tensor | None] = (None, None)
        self._pair = torch.zeros(2, 2, dtype=torch.long, device=self.graph.embed.device)

    def warm_up(self) -> None:
        """Compile (minutes on two cores, at every start: inductor does not cache graphs
        with frozen weights). Two rows from slot 0, as decode runs start but for a lane
        still prefilling there (then eager); sizes of 0 and 1 would be compiled as
        constants, so the key length is 3, and the positions written are zeroed again. The
        inputs are made outside inference mode, as the runner's are (the graph is specialised
        to that), and the graph runs in it, as the runner's decode does."""
        started = time.perf_counter()
        logger.info("compiling the decode forward (--compile-decode; minutes on a small CPU)")
        tokens = torch.zeros(2, dtype=torch.long, device=self.graph.embed.device)
        positions = torch.full_like(tokens, 2)
        # freezing set for the whole compile (as an option of torch.compile it is not seen
        # where the weights are lifted, and they stay unpacked inputs); no duck sizing, which
        # would tie the batch to any cache dimension of the same size
        with (torch.inference_mode(), inductor_config.patch(GRAPH_CONFIG),
              shape_config.patch(use_duck_shape=False)):
            # made in inference mode, as the runner's decode makes them
            lora = None if self.lora is None else self.lora.inputs([], 2)
            self.compiled(tokens, positions, 0, 3, self._unsteered(2), self.cache.keys,
                          self.cache.values, lora)
        logger.info("compiled in %.0f s", time.perf_counter() - started)
        for slot in (0, 1):
            self.cache.clear(slot, 3)

    def _view(self, buffer: torch.Tensor, rows: int) -> torch.Tensor:
        layers = self.cache.shape.num_layers
        return buffer[:layers * rows * self._width].view(layers, rows, self._width)

    def _unsteered(self, rows: int) -> torch.Tensor:
        return self._view(self._zeros, rows)

    def _additive(self, plan: SteeringPlan | None, rows: int,
                  graph_rows: int) -> torch.Tensor | None:
        """The batch's steering as the graph takes it (None: it cannot), made once per plan
        (the hosted model keeps a decode plan until its lanes change); a dummy row's zero."""
        if plan is None:
            return self._unsteered(graph_rows)
        if plan is not self._steering[0]:
            offsets = additive_residual(plan, self.cache.shape.num_layers, rows, self._width,
                                        self.graph.embed.device)
            if offsets is not None:
                steered = self._view(self._steered, graph_rows)
                steered[:, :rows].copy_(offsets)
                steered[:, rows:].zero_()
                offsets = steered
            self._steering = (plan, offsets)
        return self._steering[1]

    def _padded(self, tokens: torch.Tensor, positions: torch.Tensor, first_slot: int
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """One row as two: the second feeds the same token at the last position of the next
        lane slot (None: there is none). No lane there is decoding (it would be in this
        batch), and one prefilling has a prompt shorter than the context, so that position
        is never read before a lane writes it; what is left there is a finite number, which
        masked attention multiplies by zero (kv_cache.py). The prefix cache's slots, whose
        spans may reach that position, come after the lane slots and are never used."""
        if first_slot + 1 >= self.lane_slots:
            return None
        self._pair[0] = tokens[0]
        self._pair[1, 0] = positions[0]
        self._pair[1, 1] = self.cache.shape.max_len - 1
        return self._pair[0], self._pair[1]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, first_slot: int,
                 kv_len: int, split: AttentionSplit, plan: SteeringPlan | None,
                 lora_slots: list[int] | None = None, capture: Capture | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(logits, hidden, block outputs (layers + 1, B, C) with the embeddings first), or
        None where the batch runs eager: rows much longer than the rest (`split`, the eager
        forward's), a capture of the heads' outputs, steering that is not additive, adapter
        rows without a LoRA bank, one row with no lane slot beside it, or a batch it would
        need compiling again for. Each reason is logged the first time."""
        rows = tokens.shape[0]
        if split.saved >= keys_worth_leaving(rows):
            return self._eager("rows much longer than the rest (the eager forward attends "
                               "them alone)")
        adapted = lora_slots is not None and any(slot >= 0 for slot in lora_slots)
        if capture is not None and capture.target != SteerTarget.RESIDUAL:
            return self._eager("a capture of the attention heads' outputs")
        if adapted and self.lora is None:
            return self._eager("LoRA adapter rows (the graph was compiled without them)")
        if rows == 1:
            padded = self._padded(tokens, positions, first_slot)
            if padded is None:
                return self._eager("one row in the last lane slot (no slot for its dummy row)")
            tokens, positions = padded
        steering = self._additive(plan, rows, tokens.shape[0])
        if steering is None:
            return self._eager("steering edits other than added vectors (ablation, clamping, "
                               "head offsets, SAE features)")
        lora = None if self.lora is None else self.lora.inputs(
            lora_slots if adapted else [], tokens.shape[0])
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                logits, hidden, blocks = self.compiled(tokens, positions, first_slot, kv_len,
                                                       steering, self.cache.keys,
                                                       self.cache.values, lora)
            self.steps += 1
            return logits[:rows], hidden[:rows], blocks[:, :rows]
        except RuntimeError as exc:
            if not str(exc).startswith(RECOMPILE):
                raise
            # unexpected (the graph takes any batch it is given): a warning, with the message
            # naming the guards that failed
            return self._eager("a batch it was not compiled for", f": {exc}", logging.WARNING)

    def _eager(self, reason: str, detail: str = "", level: int = logging.INFO) -> None:
        """None, logging `reason` the first time a batch leaves the graph for it (a fixed
        set of reasons: the set stays small whatever the requests are)."""
        if reason not in self.eager_reasons:
            self.eager_reasons.add(reason)
            logger.log(level, "compiled decode: %s%s: the batch runs the eager forward "
                       "(logged once)", reason, detail)
        return None
