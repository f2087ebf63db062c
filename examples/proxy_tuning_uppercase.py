#!/usr/bin/env python
"""Proxy-tuning on real weights: SmolLM2 steered by the example uppercase LoRA adapter.

    .venv/bin/python examples/proxy_tuning_uppercase.py [--max-tokens 40]

Base = SmolLM2-135M-Instruct, expert = the same model with examples/adapters/uppercase,
anti-expert = the base (so base and anti-expert share one lane). For alpha in 0, 0.25, 0.5
and 1 it prints the upper-case share of the letters in four greedy answers, beside plain
decoding: alpha 0 is plain decoding exactly, and the adapter's behaviour grows with alpha
(at alpha 1, base + (expert - base) is the expert itself).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from steerserve.adapters.lora.files import load_lora_adapter
from steerserve.decoding.engine.core import Engine, EngineConfig
from steerserve.decoding.methods.plain import Plain
from steerserve.decoding.methods.proxy_tuning import ProxyTuning
from steerserve.decoding.model.loader import load_model
from steerserve.decoding.request import EngineRequest, LaneSpec
from steerserve.decoding.sampling.params import SamplingParams

REPO = Path(__file__).resolve().parent.parent

QUESTIONS = ["Name three rivers in Europe.", "How do plants make food?",
             "Give me a tip for a job interview.", "What is a good name for a cat?"]


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def answers(engine: Engine, prompts: list[tuple[int, ...]], adapter, alpha: float | None,
            max_tokens: int) -> list[str]:
    texts: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        base = LaneSpec(engine.primary.name, ids)
        method = Plain((base,)) if alpha is None else ProxyTuning(
            (base, LaneSpec(base.model, ids, adapter), LaneSpec(base.model, ids)), alpha)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        engine.submit(EngineRequest(str(i), ids, params, method),
                      lambda out, i=i: texts[i].append(out.text))
    while engine.has_work():
        engine.step()
    return ["".join(texts[i]) for i in range(len(prompts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=40, help="new tokens per answer")
    args = parser.parse_args()
    loaded = load_model("SmolLM2-135M-Instruct", dtype="float32", max_model_len=1024)
    engine = Engine(loaded, EngineConfig(max_num_seqs=16, max_loras=1, max_lora_rank=16))
    adapter = load_lora_adapter("uppercase", REPO / "examples" / "adapters" / "uppercase",
                                engine.primary.lora_slots.bank.linears, 16, dtype=torch.float32)
    tokenizer = loaded.tokenizer
    prompts = [tuple(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                   add_generation_prompt=True,
                                                   return_dict=False)) for q in QUESTIONS]
    print("| decoding | upper-case share | first answer |\n|---|---|---|")
    for alpha in (None, 0.0, 0.25, 0.5, 1.0):
        texts = answers(engine, prompts, adapter, alpha, args.max_tokens)
        share = sum(map(upper_share, texts)) / len(texts)
        label = "plain" if alpha is None else f"proxy-tuning, alpha {alpha}"
        print(f"| {label} | {share:.3f} | {texts[0][:60]!r} |")


if __name__ == "__main__":
    main()
