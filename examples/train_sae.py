"""Train a small sparse autoencoder (ReLU + L1) on SmolLM2-135M-Instruct's residual stream after
block 15 (of 30), on CPU in about 3 minutes, and save it in SAELens's layout for `--sae`.

Text, built here (no downloads): Python's own documentation topics (`pydoc_data`, English
prose shipped with every CPython) plus templated sentences on a dozen everyday topics (the sea,
food, space, music, weather...), so the SAE has concrete concepts to find. Texts are batched
shortest first (little padding) until --tokens are collected. Activations are
taken at every position but the first (its norm is an outlier in most LMs), shuffled, and
scaled to unit mean squared norm for training; the scale is folded back into the weights, so
the saved SAE reads the raw residual stream.

SAE (the standard SAELens architecture): f = relu((x - b_dec) W_enc + b_enc),
x_hat = f W_dec + b_dec. Loss: mean squared error + l1 * sum_j f_j |W_dec_j| (the decoder-norm
weighted penalty of Anthropic's April 2024 update), Adam, l1 warmed up over the first tenth.
Reported on held-out tokens: fraction of variance unexplained, L0, and dead features (never
active on any held-out token).

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python examples/train_sae.py
    # writes examples/sae/smollm2-l15; 176 s on one core of the 2-core CI machine: FVU 0.24,
    # L0 8.8, 17% dead features on held-out tokens (docs/sae.md). Use one thread when another
    # job shares the cores: oversubscribed OpenMP threads made collection 50x slower.

Serve it: `steerserve serve --sae l15=examples/sae/smollm2-l15`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import time
from pathlib import Path

import torch

from steerserve.adapters.sae.files import save_sae
from steerserve.decoding.model.loader import EMBEDDED_MODEL_NAME, load_model

TOPICS = {
    "sea": ["the ocean", "the sea", "the waves", "a sandy beach", "the tide", "a coral reef",
            "a fishing boat", "the harbor", "a sailor", "the shore"],
    "food": ["fresh bread", "a bowl of soup", "the pasta", "a ripe tomato", "chocolate cake",
             "the kitchen", "a spicy curry", "grilled fish", "a cup of tea", "the bakery"],
    "space": ["the stars", "a distant planet", "the moon", "a rocket", "the galaxy",
              "an astronaut", "a telescope", "the solar system", "a comet", "the orbit"],
    "music": ["the guitar", "a piano", "the orchestra", "a song", "the drums", "a melody",
              "the choir", "a violin", "the concert", "a jazz band"],
    "weather": ["the rain", "a storm", "the snow", "the wind", "a sunny sky", "the fog",
                "thunder", "a cold winter", "the heat", "the clouds"],
    "animals": ["a dog", "the cat", "a horse", "the birds", "a lion", "the rabbit", "an owl",
                "a herd of cows", "the fox", "a little mouse"],
    "city": ["the subway", "a busy street", "the skyscrapers", "a traffic jam", "the market",
             "a taxi", "the city hall", "a crowded square", "the bus stop", "an apartment"],
    "sport": ["the football match", "a tennis player", "the marathon", "a basketball",
              "the swimmer", "a goal", "the stadium", "a cyclist", "the referee", "a race"],
    "computers": ["the computer", "a keyboard", "the software", "a program", "the server",
                  "a database", "the network", "a laptop", "the code", "an algorithm"],
    "garden": ["the roses", "a vegetable garden", "the trees", "fresh grass", "the tulips",
               "a watering can", "the soil", "a tall sunflower", "the hedge", "green leaves"],
    "feelings": ["great joy", "deep sadness", "a sudden fear", "quiet calm", "anger",
                 "a warm love", "loneliness", "hope", "pride", "gratitude"],
    "school": ["the teacher", "a classroom", "the homework", "an exam", "the library",
               "a student", "the blackboard", "a lesson", "the principal", "a notebook"],
}
TEMPLATES = [
    "I spent the whole afternoon thinking about {a}.", "She told me a long story about {a}.",
    "Nothing is as beautiful as {a} and {b}.", "We talked about {a} for hours.",
    "My grandfather loved {a} more than anything.", "Have you ever seen {a} up close?",
    "The book describes {a}, {b} and {c}.", "Every morning he writes about {a}.",
    "They took a picture of {a} next to {b}.", "In the evening we watched {a}.",
    "The children asked many questions about {a}.", "It reminded me of {a} and {b}.",
]


def build_corpus(seed: int, sentences: int) -> list[str]:
    """Templated topic sentences plus paragraphs of CPython's documentation topics."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    texts = []
    for _ in range(sentences):
        words = rng.sample(TOPICS[rng.choice(sorted(TOPICS))], 3)
        texts.append(rng.choice(TEMPLATES).format(a=words[0], b=words[1], c=words[2]))
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) > 80 and not paragraph.startswith(("*", ">>>", "-", "=")):
                texts.append(paragraph[:600])
    rng.shuffle(texts)
    return texts


@torch.no_grad()
def collect(model, tokenizer, texts: list[str], layer: int, max_tokens: int,
            batch: int = 16) -> torch.Tensor:
    """Residual after block `layer` at every real token but the first: (N, hidden) fp32.
    Blocks past `layer` are skipped by stopping the forward from a hook."""
    found: list[torch.Tensor] = []

    class Stop(Exception):
        pass

    def grab(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        found.append(hidden.float())
        raise Stop

    handle = model.model.layers[layer].register_forward_hook(grab)
    acts, total, started = [], 0, time.monotonic()
    texts = sorted(texts, key=len)  # similar lengths per batch: little padding to compute
    try:
        for start in range(0, len(texts), batch):
            encoded = tokenizer(texts[start:start + batch], return_tensors="pt", padding=True,
                                truncation=True, max_length=128)
            with contextlib.suppress(Stop):
                model(**encoded)
            hidden, mask = found.pop(), encoded["attention_mask"].bool()
            mask[:, 0] = False  # drop each text's first position (left padding is off)
            acts.append(hidden[mask])
            total += acts[-1].shape[0]
            if start // batch % 25 == 0:
                print(f"  activations: {total} tokens ({time.monotonic() - started:.0f} s)")
            if total >= max_tokens:
                break
    finally:
        handle.remove()
    return torch.cat(acts)[:max_tokens]


class SAE(torch.nn.Module):
    def __init__(self, d_in: int, d_sae: int, mean: torch.Tensor, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(d_sae, d_in, generator=generator)
        directions = 0.1 * directions / directions.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(directions.clone())
        self.W_enc = torch.nn.Parameter(directions.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(mean.clone())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return f @ self.W_dec + self.b_dec, f


def train(sae: SAE, data: torch.Tensor, steps: int, batch: int, l1: float, lr: float,
          seed: int) -> None:
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    for step in range(steps):
        x = data[torch.randint(0, data.shape[0], (batch,), generator=generator)]
        x_hat, f = sae(x)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        sparsity = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
        coefficient = l1 * min(1.0, step / max(1, steps // 10))
        loss = mse + coefficient * sparsity
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            l0 = (f > 0).float().sum(-1).mean()
            print(f"  step {step:4d}: mse {mse.item():.4f}  L0 {l0.item():.1f}  "
                  f"({time.monotonic() - started:.0f} s)")


@torch.no_grad()
def evaluate(sae: SAE, held_out: torch.Tensor) -> dict:
    x_hat, f = sae(held_out)
    fvu = (x_hat - held_out).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum()
    return {"fraction_of_variance_unexplained": round(fvu.item(), 4),
            "l0": round((f > 0).float().sum(-1).mean().item(), 1),
            "dead_fraction": round(((f > 0).sum(0) == 0).float().mean().item(), 4),
            "held_out_tokens": held_out.shape[0]}


def raw_space_tensors(sae: SAE, scale: float) -> dict[str, torch.Tensor]:
    """Trained on x * scale; the same SAE on raw x: W_enc * scale, W_dec / scale, b_dec /
    scale (then (x - b_dec) W_enc is unchanged and x_hat comes out in raw units)."""
    return {"W_enc": sae.W_enc.detach() * scale, "b_enc": sae.b_enc.detach(),
            "W_dec": sae.W_dec.detach() / scale, "b_dec": sae.b_dec.detach() / scale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=60_000)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--l1", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto",
                        help="the model's dtype while collecting (the slow part): auto = "
                        "bfloat16 where the CPU has it")
    parser.add_argument("--out", default="examples/sae/smollm2-l15")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.monotonic()

    loaded = load_model(EMBEDDED_MODEL_NAME, dtype=args.dtype)
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = build_corpus(args.seed, sentences=4000)
    print(f"corpus: {len(texts)} texts; collecting activations after block {args.layer}")
    acts = collect(loaded.model, tokenizer, texts, args.layer, args.tokens)
    acts = acts[torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(1))]
    scale = float(1.0 / acts.pow(2).sum(-1).mean().sqrt())
    held = max(2000, acts.shape[0] // 20)
    data, held_out = acts[held:] * scale, acts[:held] * scale

    sae = SAE(acts.shape[1], args.features, data.mean(0), args.seed)
    print(f"training {args.features} features on {data.shape[0]} tokens")
    train(sae, data, args.steps, args.batch, args.l1, args.lr, args.seed)
    report = {**evaluate(sae, held_out), "training_tokens": data.shape[0], "layer": args.layer,
              "features": args.features, "l1": args.l1, "steps": args.steps,
              "seconds": round(time.monotonic() - started)}
    print(json.dumps(report, indent=1))
    out = Path(args.out)
    save_sae(out, raw_space_tensors(sae, scale), f"blocks.{args.layer}.hook_resid_post",
             EMBEDDED_MODEL_NAME, extra={"training": report}, dtype=torch.float16)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
