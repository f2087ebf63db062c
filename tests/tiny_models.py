"""Tiny real models for fast tests: a byte-level BPE tokenizer trained on a small corpus and
random-weight Llama / Qwen2 decoders built from configs. Nothing is downloaded."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
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


def tiny_gemma(vocab_size: int, seed: int = 2) -> GemmaForCausalLM:
    """Not of the Llama family (scaled embeddings, its own norm): the module path serves it."""
    torch.manual_seed(seed)
    return GemmaForCausalLM(GemmaConfig(**_common(vocab_size), head_dim=16)).eval()
