"""Tiny real models for fast tests: a byte-level BPE tokenizer trained on a small corpus and
random-weight decoders (Llama, Qwen2, Gemma, Gemma 2 and 3 with short sliding windows and
biting soft-caps, Phi-3 for the module path) built from configs. Nothing is downloaded."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small town by the sea.",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
    "A café in München serves crème brûlée and naïve jokes.",
    "日本語のテキストと絵文字 🙂🚀 are split into several byte tokens.",
    "Hello world! How are you today? I am fine, thank you.",
] * 4


def tiny_tokenizer(vocab_size: int = 420) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", bos_token="<|im_start|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def _common(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, initializer_range=0.2, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**_common(vocab_size)))
    return model.eval()


def tiny_qwen2(vocab_size: int, seed: int = 1) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**_common(vocab_size))).eval()


def _random_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Gemma initialises its (1 + weight) norms to zero weights: random ones make a forward
    that forgets the offset, or a norm, fail."""
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.data.normal_(0.0, 0.3)
    return model.eval()


def tiny_gemma(vocab_size: int, seed: int = 2) -> GemmaForCausalLM:
    """Scaled embeddings, (1 + weight) norms, a GELU MLP."""
    torch.manual_seed(seed)
    return _random_norms(GemmaForCausalLM(GemmaConfig(**_common(vocab_size), head_dim=16)))


def tiny_gemma2(vocab_size: int, seed: int = 3) -> Gemma2ForCausalLM:
    """Sandwich norms, a 6-position window on the first layer, soft-capped attention and
    final logits (caps low enough to change the outputs), its own attention scale."""
    torch.manual_seed(seed)
    config = Gemma2Config(**_common(vocab_size), head_dim=16, sliding_window=6,
                          attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                          query_pre_attn_scalar=32)
    return _random_norms(Gemma2ForCausalLM(config))


def tiny_gemma3(vocab_size: int, seed: int = 4) -> Gemma3ForCausalLM:
    """Query/key norms and two rotary tables (local for the sliding layer, global)."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(**_common(vocab_size), head_dim=16, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"],
                              query_pre_attn_scalar=32)
    return _random_norms(Gemma3ForCausalLM(config))


def tiny_phi3(vocab_size: int, seed: int = 5) -> Phi3ForCausalLM:
    """An architecture without an own forward: the Hugging Face modules serve it."""
    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(**_common(vocab_size))).eval()
