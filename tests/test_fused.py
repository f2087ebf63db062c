"""Our own forward against the Hugging Face modules, for every family it serves, in every dtype
and on every attention path (SDPA for prefill, for one row and in fp32; grouped matmuls for
batched bf16 decode and for soft-capped logits; sliding windows), and the choice between
them."""

from __future__ import annotations

import pytest
import torch

from steerserve.decoding.model.attention_split import split_attention
from steerserve.decoding.model.loader import from_pretrained_objects
from steerserve.decoding.model.packed import can_pack
from steerserve.decoding.model.runner import ModelRunner
from tests.tiny_models import (
    tiny_gemma,
    tiny_gemma2,
    tiny_gemma3,
    tiny_llama,
    tiny_phi3,
    tiny_qwen2,
)

PROMPTS = [[1, 5, 9, 13, 4, 22, 40], [1, 7, 3], [1, 30, 31, 32, 33]]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.15, torch.float16: 0.05}


def runners(model, tokenizer, dtype) -> tuple[ModelRunner, ModelRunner]:
    loaded = from_pretrained_objects(model.to(dtype), tokenizer, "m")
    return ModelRunner(loaded, 4, None, "fused"), ModelRunner(loaded, 4, None, "hf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2, tiny_gemma, tiny_gemma2, tiny_gemma3],
                         ids=["llama", "qwen2", "gemma", "gemma2", "gemma3"])
def test_fused_logits_equal_the_modules(tokenizer, dtype, build):
    fused, modules = runners(build(len(tokenizer)), tokenizer, dtype)
    assert fused.forward_kind == "fused" and modules.forward_kind == "hf"
    atol = TOLERANCE[dtype]
    with torch.inference_mode():
        ours = fused.prefill(0, PROMPTS, [True] * 3)
        theirs = modules.prefill(0, PROMPTS, [True] * 3)
        torch.testing.assert_close(ours.last_logits, theirs.last_logits, atol=atol, rtol=0)
        for got, expected in zip(ours.prompt_logits, theirs.prompt_logits, strict=True):
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)
        positions = [len(p) for p in PROMPTS]
        tokens = [int(t) for t in theirs.last_logits.argmax(-1)]
        for _ in range(4):
            got, expected = fused.decode(0, tokens, positions), modules.decode(0, tokens, positions)
            torch.testing.assert_close(got.logits, expected.logits, atol=atol, rtol=0)
            # One row alone takes the single-row path (the same token again: same cache entry)
            single = fused.decode(0, tokens[:1], positions[:1]).logits
            torch.testing.assert_close(single, expected.logits[:1], atol=atol, rtol=0)
            tokens = [int(t) for t in expected.logits.argmax(-1)]
            positions = [p + 1 for p in positions]

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma2, tiny_gemma3],
                         ids=["llama", "gemma2", "gemma3"])
def test_a_long_row_attends_alone_as_the_modules_attend_it(tokenizer, dtype, build):
    """One long row among short ones attends alone, over its own length (sliding windows and
    soft-capping included), while the short rows read a shorter shared window; the Hugging
    Face modules read one window for all rows, masked."""
    fused, modules = runners(build(len(tokenizer)), tokenizer, dtype)
    long_prompt = [1] + [(7 * i) % 400 + 3 for i in range(299)]
    prompts = [PROMPTS[1], long_prompt, PROMPTS[2], PROMPTS[0]]
    with torch.inference_mode():
        tokens = [int(t) for t in modules.prefill(0, prompts, [False] * 4).last_logits.argmax(-1)]
        fused.prefill(0, prompts, [False] * 4)
        positions = [len(p) for p in prompts]
        for _ in range(3):
            assert split_attention([p + 1 for p in positions]).alone == ((1, positions[1] + 1),)
            got, expected = fused.decode(0, tokens, positions), modules.decode(0, tokens, positions)
            torch.testing.assert_close(got.logits, expected.logits, atol=TOLERANCE[dtype], rtol=0)
            tokens = [int(t) for t in expected.logits.argmax(-1)]
            positions = [p + 1 for p in positions]


def test_other_architectures_run_the_modules(tokenizer):
    loaded = from_pretrained_objects(tiny_phi3(len(tokenizer)), tokenizer, "p")
    assert ModelRunner(loaded, 2, None, "auto").forward_kind == "hf"
    with pytest.raises(ValueError, match="'phi3' has no own forward"):
        ModelRunner(loaded, 2, None, "fused")


def test_fusing_shares_the_weights(tokenizer):
    model = tiny_llama(len(tokenizer))
    runner = ModelRunner(from_pretrained_objects(model, tokenizer, "m"), 2, None, "fused")
    layer, attention = runner.forward.layers[0], model.model.layers[0].self_attn
    assert attention.q_proj.weight.data_ptr() == layer.qkv.weight.data_ptr()  # a view
    assert attention.k_proj.weight.data_ptr() == layer.qkv.weight[64:].data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_plain_products_row_by_row(tokenizer, dtype):
    """oneDNN-packed projections and LM head: the logits F.linear gives, in prefill and decode
    (the engine tests check that greedy tokens do not depend on the batch, packed or not)."""
    loaded = from_pretrained_objects(tiny_qwen2(len(tokenizer)).to(dtype), tokenizer, "m")
    packed = ModelRunner(loaded, 4, None, "fused", packed_weights=True)
    plain = ModelRunner(loaded, 4, None, "fused", packed_weights=False)
    if not can_pack(torch.device("cpu"), dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    assert packed.forward.layers[0].qkv.packed is not None and packed.head.packed is not None
    assert plain.forward.layers[0].qkv.packed is None
    with torch.inference_mode():
        ours, theirs = packed.prefill(0, PROMPTS, [True] * 3), plain.prefill(0, PROMPTS, [True] * 3)
        torch.testing.assert_close(ours.last_logits, theirs.last_logits,
                                   atol=TOLERANCE[dtype], rtol=0)
        positions, tokens = [len(p) for p in PROMPTS], [5, 6, 7]
        torch.testing.assert_close(packed.decode(0, tokens, positions).logits,
                                   plain.decode(0, tokens, positions).logits,
                                   atol=TOLERANCE[dtype], rtol=0)
