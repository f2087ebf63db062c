#!/usr/bin/env python
"""Steer SmolLM2 toward the sea four ways, measured alike: unsteered, a difference-of-means
vector, learned head offsets (LoFiT), and an SAE feature.

    .venv/bin/python benchmarks/steering_compare.py

Every method gets its data from examples/train_head_offsets.py: its positive (sea) and
negative (neutral) responses, its training prompts and its held-out prompts, and its measure
(`ocean_score`: whether a reply has a sea word, how many, and the share of distinct words, a
guard against degenerate repetition).
- **Vector:** extracted by the server (`mean_diff`) from the bare responses on blocks 10-20,
  and (`vector-l15`) from the whole chats (prompt, then the sea or the neutral answer) on
  block 15 alone, the SAE's layer.
- **LoFiT:** the offsets examples/train_head_offsets.py saved, on the heads it selected.
- **SAE feature:** the feature of examples/sae/smollm2-l15 whose mean activation on sea-word
  tokens of the responses most exceeds its mean on the other tokens (found by program), added
  with a scale in units of its largest activation there.

Each method's strength is chosen on the TRAINING prompts: the largest hit rate whose mean
distinct share stays at least 0.6. Only then is it scored once on the held-out prompts (greedy,
48 tokens, through one server, all prompts of a setting in one batch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_servers import OFFLINE_ENV, ManagedServer, free_port  # noqa: E402
from train_head_offsets import (  # noqa: E402
    HELD_OUT_PROMPTS,
    OCEAN_WORDS,
    TRAIN_PROMPTS,
    make_pairs,
    mean_scores,
)

from steerserve.adapters.sae.files import load_sae  # noqa: E402
from steerserve.decoding.model.loader import EMBEDDED_MODEL_NAME, load_model  # noqa: E402

SAE_DIR = REPO / "examples/sae/smollm2-l15"
LOFIT = REPO / "examples/steering/ocean_lofit"
MIN_DISTINCT = 0.6
GRIDS = {"vector": [0.25, 0.5, 1.0, 1.5], "vector-l15": [2.0, 4.0, 6.0, 8.0, 12.0],
         "lofit": [0.5, 1.0, 1.5, 2.0], "sae": [0.25, 0.5, 0.75, 1.0]}


def chat_texts(tokenizer, pairs) -> tuple[list[str], list[str]]:
    """Each pair as a whole chat (its prompt, then the sea or the neutral answer): the pairs
    differ only in the answer, as repeng builds its contrastive pairs."""
    def render(prompt: str, answer: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}],
                                             tokenize=False)
    return ([render(p.prompt, p.positive) for p in pairs],
            [render(p.prompt, p.negative) for p in pairs])


@torch.no_grad()
def sea_feature(loaded, texts: list[str]) -> tuple[int, float, float]:
    """(feature, its largest activation on sea tokens, its mean-activation gap)."""
    sae = load_sae("l15", SAE_DIR)
    found: list[torch.Tensor] = []
    loaded.model.model.layers[sae.layer].register_forward_hook(
        lambda m, a, out: found.append(out[0] if isinstance(out, tuple) else out))
    acts, sea = [], []
    for text in texts:
        ids = loaded.tokenizer(text)["input_ids"]
        loaded.model(torch.tensor([ids]))
        acts.append(sae.encode(found.pop()[0])[1:])  # the first position is an outlier
        words = [loaded.tokenizer.decode([i]).strip().lower() for i in ids[1:]]
        sea.append(torch.tensor([w in OCEAN_WORDS for w in words]))
    acts, sea = torch.cat(acts), torch.cat(sea)
    gap = acts[sea].mean(0) - acts[~sea].mean(0)
    feature = int(gap.argmax())
    return feature, float(acts[sea, feature].max()), float(gap[feature])


async def replies(client: httpx.AsyncClient, url: str, prompts: list[str],
                  steering: list[dict] | None, max_tokens: int) -> list[str]:
    async def one(prompt: str) -> str:
        body = {"model": EMBEDDED_MODEL_NAME, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": prompt}]}
        if steering:
            body["steering"] = steering
        response = await client.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]
    return list(await asyncio.gather(*(one(p) for p in prompts)))


def steering_for(method: str, strength: float, facts: dict) -> list[dict] | None:
    if method == "vector":
        return [{"vector": "sea-mean-diff", "scale": strength}]
    if method == "vector-l15":
        return [{"vector": "sea-chat-l15", "scale": strength}]
    if method == "lofit":
        return [{"vector": "ocean_lofit", "target": "heads", "heads": facts["heads"],
                 "scale": strength}]
    if method == "sae":
        return [{"sae": "l15", "feature": facts["feature"],
                 "scale": strength * facts["feature_max"]}]
    return None


async def evaluate(url: str, facts: dict, max_tokens: int, tune_prompts: list[str]) -> list:
    rows = []
    async with httpx.AsyncClient() as client:
        plain = mean_scores(await replies(client, url, HELD_OUT_PROMPTS, None, max_tokens))
        rows.append(("unsteered", "-", plain))
        for method, grid in GRIDS.items():
            best = None
            for strength in grid:
                scores = mean_scores(await replies(client, url, tune_prompts, steering_for(
                    method, strength, facts), max_tokens))
                print(f"  tune {method} {strength}: {scores}", flush=True)
                if scores["distinct_ratio"] >= MIN_DISTINCT and (
                        best is None or scores["hit"] > best[1]["hit"]):
                    best = (strength, scores)
            if best is None:
                rows.append((method, "none kept", {}))
                continue
            held = mean_scores(await replies(client, url, HELD_OUT_PROMPTS, steering_for(
                method, best[0], facts), max_tokens))
            rows.append((method, best[0], held))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--tune-prompts", type=int, default=12)
    args = parser.parse_args()
    pairs = make_pairs(2, random.Random(0))
    positive, negative = [p.positive for p in pairs], [p.negative for p in pairs]
    loaded = load_model(EMBEDDED_MODEL_NAME, dtype="float32")
    feature, feature_max, gap = sea_feature(loaded, positive)
    chat_positive, chat_negative = chat_texts(loaded.tokenizer, pairs)
    del loaded
    print(f"SAE feature {feature}: max activation {feature_max:.2f}, gap {gap:.2f}")
    facts = {"feature": feature, "feature_max": feature_max,
             "heads": json.loads(LOFIT.with_suffix(".json").read_text())["heads"]}
    port = free_port()
    command = [str(REPO / ".venv/bin/steerserve"), "serve", "--port", str(port),
               "--dtype", "float32", "--vectors-dir", "none", "--allow-runtime-vectors",
               "--sae", f"l15={SAE_DIR}", "--steering-vector",
               f"ocean_lofit={LOFIT.with_suffix('.safetensors')}", "--log-level", "warning"]
    with ManagedServer("steerserve", command, port, REPO / ".bench/logs/compare.log",
                       OFFLINE_ENV) as server:
        server.wait_healthy(300)
        url = f"http://127.0.0.1:{port}"
        for name, layers, texts in (
                ("sea-mean-diff", {"start": 10, "end": 20}, (positive, negative)),
                ("sea-chat-l15", [15], (chat_positive, chat_negative))):
            made = httpx.post(f"{url}/v1/steering/vectors", timeout=600, json={
                "name": name, "model": EMBEDDED_MODEL_NAME, "method": "mean_diff",
                "layers": layers, "positive": texts[0], "negative": texts[1]})
            made.raise_for_status()
        rows = asyncio.run(evaluate(url, facts, args.max_tokens,
                                    [p for p, _ in TRAIN_PROMPTS[:args.tune_prompts]]))
    print(f"\n{len(HELD_OUT_PROMPTS)} held-out prompts, greedy, {args.max_tokens} tokens\n")
    print("| method | strength (tuned on training prompts) | replies with a sea word | "
          "sea words per reply | distinct-word share |\n|---|---|---|---|---|")
    for method, strength, s in rows:
        if not s:
            print(f"| {method} | {strength} | - | - | - |")
            continue
        print(f"| {method} | {strength} | {s['hit']:.2f} | {s['count']:.2f} | "
              f"{s['distinct_ratio']:.2f} |")


if __name__ == "__main__":
    main()
