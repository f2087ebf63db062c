"""The embedded SmolLM2-135M-Instruct: engine vs HF generate, and a live streamed chat."""

from __future__ import annotations

import openai
import pytest
from conftest import LiveServer, make_engine
from engine_helpers import Collector, hf_greedy, run_to_completion

from decoding.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


def test_batched_greedy_equals_hf_generate(smollm2):
    tokenizer = smollm2.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                      add_generation_prompt=True, return_dict=False)
        for q in ("What is the capital of France?", "Write a haiku about the sea.",
                  "List three prime numbers.")
    ]
    engine = make_engine(smollm2)
    collector = Collector()
    for i, prompt in enumerate(prompts):
        collector.submit(engine, str(i), list(prompt),
                         SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    run_to_completion(engine)
    for i, prompt in enumerate(prompts):
        assert collector.tokens(str(i)) == hf_greedy(smollm2.model, list(prompt), 24)


def test_streamed_chat_on_the_default_server():
    server = LiveServer([])  # the README's default: embedded model, automatic dtype
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", stream=True, max_tokens=30, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
        assert "Paris" in text
    finally:
        server.stop()
