"""Our own forward for the families in decoding/model/families.py (Llama, Mistral, Qwen2,
Qwen3, Gemma, Gemma 2, Gemma 3).

Fused QKV and gate/up weights (the original projections become views into them, so the
Hugging Face modules stay usable: hf_modules.fuse_in_place), each projection run on a copy
packed once for oneDNN where the CPU allows (model/packed.py), RMSNorm, RoPE (through the
model's own rotary module, so every RoPE variant it supports holds), sliding windows and
attention-logit soft-capping, and SDPA or grouped matmuls straight over the slot cache, with
every hook point called directly: LoRA rows on every projection, head offsets at the output
projection's input, residual steering and captures at each block's output. Every other
architecture runs the Hugging Face modules (decoding/model/runner.py chooses, and says why).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from steerserve.adapters.lora.bank import LoraBank
from steerserve.adapters.steering.plan import SteeringPlan
from steerserve.decoding.model import hook_points
from steerserve.decoding.model.capture import Capture
from steerserve.decoding.model.families import (
    FAMILIES,
    offset_rms_norm,
    rms_norm,
    rotary_table,
    sliding_mask,
    sliding_window,
)
from steerserve.decoding.model.hf_modules import base_linear, fuse_in_place
from steerserve.decoding.model.packed import Projection


def _weight(module: torch.nn.Module | None) -> torch.Tensor | None:
    return module.weight if module is not None else None


@dataclass(frozen=True)
class AttentionMasks:
    boolean: torch.Tensor  # (B, 1, T, K): which keys each query sees
    additive: torch.Tensor | None = None  # (B KV, G, K) 0 / -inf, batched decode only


@dataclass
class FusedLayer:
    index: int
    prefix: str  # the layer's module path, for LoRA keys
    attention_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qkv: Projection  # (Q + 2 KV, C)
    o: Projection  # (C, Q)
    gate_up: Projection  # (2 I, C)
    down: Projection  # (C, I)
    act: Callable[[torch.Tensor], torch.Tensor]
    scale: float
    softcap: float | None = None  # Gemma 2: tanh soft-capping of the attention logits
    window: int | None = None  # sliding-window layers: how many positions back they see
    rotary: str | None = None  # which rotary table (Gemma 3: local and global)
    q_norm: torch.Tensor | None = None  # Qwen3, Gemma 3: RMSNorm over each head
    k_norm: torch.Tensor | None = None
    attention_out_norm: torch.Tensor | None = None  # Gemma 2/3's sandwich norms
    mlp_out_norm: torch.Tensor | None = None


def _layer(index: int, prefix: str, layer: torch.nn.Module, config, sandwich: bool,
           pack: bool) -> FusedLayer:
    attention, mlp = layer.self_attn, layer.mlp
    qkv = fuse_in_place([attention.q_proj, attention.k_proj, attention.v_proj])
    gate_up = fuse_in_place([mlp.gate_proj, mlp.up_proj])
    o, down = base_linear(attention.o_proj), base_linear(mlp.down_proj)
    mlp_norm = layer.pre_feedforward_layernorm if sandwich else layer.post_attention_layernorm
    return FusedLayer(
        index, prefix, layer.input_layernorm.weight, mlp_norm.weight, Projection(*qkv, pack),
        Projection(o.weight, o.bias, pack), Projection(*gate_up, pack),
        Projection(down.weight, down.bias, pack), mlp.act_fn, attention.scaling,
        getattr(attention, "attn_logit_softcapping", None), sliding_window(config, index),
        rotary_table(config, index), _weight(getattr(attention, "q_norm", None)),
        _weight(getattr(attention, "k_norm", None)),
        layer.post_attention_layernorm.weight if sandwich else None,
        layer.post_feedforward_layernorm.weight if sandwich else None)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def grouped_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, additive: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Decode attention, one new position per row: q (B, H, 1, D), the cache's window k, v
    (B, KV, K, D), additive (B KV, H / KV, K) 0 / -inf -> (B, H, 1, D). The heads that share
    a KV head attend as one batched matmul, with no repeated keys; scale and mask in one
    baddbmm, the softmax upcasting itself (a step 1-6% faster than masking per layer,
    benchmarks/decode_attention.py). bf16/fp16 batches copy the window first (see
    `FusedDecoder._grouped_attention`; then 2-3x faster than SDPA's kernel, which wins for
    one row); fp32 reads the strided window itself, 1.3-1.6x faster than SDPA at 8-64 rows
    of 100 keys and level at 500, and runs for one row too, so a row's arithmetic does not
    depend on the batch size (docs/benchmarks.md)."""
    batch, heads, _, dim = q.shape
    kv_heads, keys = k.shape[1], k.shape[2]
    rows = batch * kv_heads
    if k.dtype != torch.float32:
        k, v = k.contiguous(), v.contiguous()
    # a slice of the slot cache's rows: slots and heads still fold into one dimension
    k, v = k.reshape(rows, keys, dim), v.reshape(rows, keys, dim)
    grouped = q.reshape(rows, heads // kv_heads, dim)
    scores = torch.baddbmm(additive, grouped, k.transpose(1, 2), alpha=scale)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.bmm(weights, v).view(batch, heads, 1, dim)


class FusedDecoder:
    """Called like the Hugging Face decoder by the runner: (B, T) ids -> (B, T, C) normed."""

    def __init__(self, model: torch.nn.Module, lora_bank: LoraBank | None,
                 pack: bool = True) -> None:
        config = model.config
        family = FAMILIES[config.model_type]
        prefix = model.base_model_prefix
        decoder = getattr(model, prefix)
        self.embed, self.norm, self.rotary = decoder.embed_tokens, decoder.norm, decoder.rotary_emb
        self._rotary_takes_table = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.lora_bank = lora_bank
        self.eps = config.rms_norm_eps
        self.rms_norm = offset_rms_norm if family.offset_norms else rms_norm
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = [_layer(i, f"{prefix}.layers.{i}", layer, config, family.sandwich_norms,
                              pack) for i, layer in enumerate(decoder.layers)]

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 window, steering: SteeringPlan | None,
                 capture: Capture | None = None) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, C)
        hook_points.embeddings(capture, x)
        rotations = {table: self.rotation(x, position_ids, table)
                     for table in {layer.rotary for layer in self.layers}}
        sizes = {layer.window for layer in self.layers}
        masks = {size: self._masks(mask if size is None else
                                   sliding_mask(mask, position_ids, size), x.dtype)
                 for size in sizes}
        alone = window.alone if window is not None else ()
        alone_masks = {size: self._alone_masks(position_ids, alone, size, x.dtype)
                       for size in sizes}
        lora = self.lora_bank.active if self.lora_bank is not None else None
        for layer in self.layers:
            x = x + self._attention(layer, x, rotations[layer.rotary], masks[layer.window],
                                    alone_masks[layer.window], window, steering, capture, lora)
            x = x + self._mlp(layer, x, lora)
            hook_points.block_output(steering, capture, layer.index, x)
        return self.norm(x)

    def _masks(self, mask: torch.Tensor, dtype: torch.dtype) -> AttentionMasks:
        """The boolean mask, and for a decode on the grouped path (fp32 at any batch, bf16/fp16
        batched) the same as additive rows per (row, KV head), made once per forward rather
        than once per layer."""
        batch, _, length, keys = mask.shape
        if length != 1 or (batch == 1 and dtype != torch.float32):
            return AttentionMasks(mask)
        group = self.heads // self.kv_heads
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        additive = additive.masked_fill(~mask, float("-inf"))  # (B, 1, 1, K)
        additive = additive.expand(batch, self.kv_heads, group, keys)
        return AttentionMasks(mask, additive.reshape(batch * self.kv_heads, group, keys))

    def _alone_masks(self, position_ids: torch.Tensor, alone: tuple[tuple[int, int], ...],
                     size: int | None, dtype: torch.dtype) -> tuple[AttentionMasks, ...]:
        """The masks of each row that attends alone, as if it were decoded by itself: every
        key up to its length, narrowed where layers slide."""
        masks = []
        for row, length in alone:
            mask = torch.ones(1, 1, 1, length, dtype=torch.bool, device=position_ids.device)
            if size is not None:
                mask = sliding_mask(mask, position_ids[row:row + 1], size)
            masks.append(self._masks(mask, dtype))
        return tuple(masks)

    def rotation(self, x: torch.Tensor, position_ids: torch.Tensor,
                  table: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, (B, T, 1, D), from the model's rotary module."""
        extra = (table,) if self._rotary_takes_table else ()
        cos, sin = self.rotary(x, position_ids, *extra)  # (B, T, D)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def _lora(self, lora, key: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Adds the rows' adapter deltas of projection `key` into y (a view of its output)."""
        bank = self.lora_bank
        if lora is None or key not in bank.lora_a:
            return
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if bank.use_triton and not flat_y.is_contiguous():  # the kernels write whole rows
            delta = torch.zeros_like(flat_y, memory_format=torch.contiguous_format)
            bank.apply(key, flat_x, delta, lora)
            flat_y += delta
        else:
            bank.apply(key, flat_x, flat_y, lora)

    def _lora_fused(self, lora, keys: tuple[str, ...], x: torch.Tensor, y: torch.Tensor,
                    parts: tuple[torch.Tensor, ...]) -> None:
        """The deltas of projections fused into one output y (QKV, gate/up): on the dense
        path one shrinking product for all of them, then one per part (measured in
        docs/benchmarks.md); the kernels take them one by one."""
        if lora is None:
            return
        if self.lora_bank.use_triton:
            for key, part in zip(keys, parts, strict=True):
                self._lora(lora, key, x, part)
            return
        widths = tuple(part.shape[-1] for part in parts)
        self.lora_bank.apply_fused(keys, widths, x.reshape(-1, x.shape[-1]),
                                   y.view(-1, y.shape[-1]), lora)

    def _attention(self, layer: FusedLayer, x, rotation, mask, alone_masks, window, steering,
                   capture, lora):
        batch, length, _ = x.shape
        h = self.rms_norm(x, layer.attention_norm, self.eps)
        qkv = layer.qkv(h)  # (B, T, Q + 2 KV)
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
        attention = f"{layer.prefix}.self_attn"
        self._lora_fused(lora, tuple(f"{attention}.{name}" for name in ("q_proj", "k_proj",
                                                                         "v_proj")),
                         h, qkv, (q, k, v))
        # queries and keys rotated as one tensor: half the small ops of rotating each
        qk = qkv[..., :q_width + kv_width].view(batch, length, self.heads + self.kv_heads,
                                                self.head_dim)
        if layer.q_norm is not None:
            qk = torch.cat([self.rms_norm(qk[:, :, :self.heads], layer.q_norm, self.eps),
                            self.rms_norm(qk[:, :, self.heads:], layer.k_norm, self.eps)], 2)
        cos, sin = rotation
        qk = qk * cos + rotate_half(qk) * sin
        q, k = qk[:, :, :self.heads].transpose(1, 2), qk[:, :, self.heads:].transpose(1, 2)
        v = v.reshape(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if window is not None:
            k, v = window.update(k, v, layer.index)  # (B, KV, L, D) up to the shared length
        out = self._attend(layer, q, k, v, mask)
        for (row, key_length), row_mask in zip(window.alone if window is not None else (),
                                                alone_masks, strict=True):
            row_keys, row_values = window.row_alone(layer.index, row, key_length)
            out[row:row + 1] = self._attend(layer, q[row:row + 1], row_keys, row_values,
                                            row_mask)
        out = out.transpose(1, 2).reshape(batch, length, q_width)  # (B, T, NH * D)
        hook_points.heads_output(steering, capture, layer.index, out)
        o = layer.o(out)
        self._lora(lora, f"{attention}.o_proj", out, o)
        if layer.attention_out_norm is not None:
            o = self.rms_norm(o, layer.attention_out_norm, self.eps)
        return o

    def _attend(self, layer: FusedLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: AttentionMasks) -> torch.Tensor:
        """(B, H, T, D) queries over (B, KV, K, D) keys and values -> (B, H, T, D)."""
        batch, _, length, _ = q.shape
        if layer.softcap is None and mask.additive is not None:
            return self._grouped_decode(layer, q, k, v, mask.additive)
        if layer.softcap is not None or (length == 1 and batch > 1
                                         and q.dtype != torch.float32):
            return self._grouped_attention(layer, q, k, v, mask.boolean)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.boolean,
                                              scale=layer.scale,
                                              enable_gqa=self.heads != self.kv_heads)

    def _grouped_attention(self, layer: FusedLayer, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The heads that share a KV head attend as one batched matmul, with no repeated keys,
        the boolean mask applied after the soft-cap: for soft-capped layers (SDPA cannot cap),
        and for batched decode given no additive mask (decode_attention.py's baseline)."""
        batch, _, length, _ = q.shape
        keys, group = k.shape[2], self.heads // self.kv_heads
        # The slot cache's window is strided (rows of max_len positions): bf16 bmm on such
        # views takes a path 5-10x slower than copying them first (benchmarks/step_profile.py)
        k, v = k.contiguous(), v.contiguous()
        grouped = q.reshape(batch, self.kv_heads, group * length, self.head_dim)
        scores = torch.matmul(grouped, k.transpose(-1, -2)).float() * layer.scale
        if layer.softcap is not None:
            scores = torch.tanh(scores / layer.softcap) * layer.softcap
        scores = scores.view(batch, self.kv_heads, group, length, keys)  # (B, KV, G, T, K)
        scores = scores.masked_fill(~mask.view(batch, 1, 1, length, keys), float("-inf"))
        weights = scores.softmax(dim=-1).to(v.dtype).view(batch, self.kv_heads, -1, keys)
        out = torch.matmul(weights, v)  # (B, KV, G T, D)
        return out.reshape(batch, self.heads, length, self.head_dim)

    def _grouped_decode(self, layer: FusedLayer, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, additive: torch.Tensor) -> torch.Tensor:
        return grouped_decode(q, k, v, additive, layer.scale)

    def _mlp(self, layer: FusedLayer, x: torch.Tensor, lora) -> torch.Tensor:
        h = self.rms_norm(x, layer.mlp_norm, self.eps)
        gate_up = layer.gate_up(h)  # (B, T, 2 I)
        gate, up = gate_up.chunk(2, dim=-1)
        mlp = f"{layer.prefix}.mlp"
        self._lora_fused(lora, (f"{mlp}.gate_proj", f"{mlp}.up_proj"), h, gate_up, (gate, up))
        inner = layer.act(gate) * up
        down = layer.down(inner)
        self._lora(lora, f"{mlp}.down_proj", inner, down)
        if layer.mlp_out_norm is not None:
            down = self.rms_norm(down, layer.mlp_out_norm, self.eps)
        return down
