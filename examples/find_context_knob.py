"""Find the context-sensitivity knob of SmolLM2-135M-Instruct: one direction in one layer whose
coordinate decides whether the model answers from its context or from what it knows.

After Minder et al., "Controllable Context Sensitivity and the Knob Behind It". The recipe:
1. The task (examples/context_knob_data.py): a counterfactual context and a question ("Context:
   Paris is in Japan. Question: Which country is Paris in?") with an instruction to follow the
   context or to answer from prior knowledge.
2. At every layer, the residual stream at the position where the answer is decided (the
   prompt followed by the answer's opening "Paris is in") for the two instructions on the
   training cities; the direction is the difference of their means (unit length), the
   knob's coordinate the projection on it.
3. The layer: each layer's knob is set, on the dev cities asked without an instruction, to
   the prior side (the prior-intent mean minus twice the gap between the means) and to the
   context side (the context-intent mean plus twice the gap), and the log-odds of the claimed
   country against the true one are read at the answer position; the layer whose knob moves
   them most is kept. One pass over the layers (the paper narrows its layers with a search
   of the same linear cost, by patching a fine-tuned model; we measure the knob itself, on
   the model we serve, and do not fine-tune: a deviation, said in docs/steering.md).
Writes --out (a steerserve steering vector, the unit direction at that layer) and a JSON
beside it (same stem) with the scan, the coordinates of both means and the knob values the
docs use. About a minute on two CPU threads.

    .venv/bin/python examples/find_context_knob.py
    steerserve serve --steering-vector context_knob=examples/steering/context_knob.safetensors
    # then "steering": [{"vector": "context_knob", "mode": "clamp", "scale": <coordinate>,
    #                    "apply_to": "generation"}]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from context_knob_data import Item, split  # noqa: E402

from steerserve.adapters.steering.vectors import SteeringVector, save_safetensors  # noqa: E402
from steerserve.decoding.model.loader import EMBEDDED_MODEL_NAME, load_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "steering" / "context_knob.safetensors"
SIDE = 2.0  # the knob's test settings: this many gaps beyond each intent's mean


def answer_position_prompt(tokenizer, item: Item, intent: str) -> list[int]:
    """The chat prompt and the answer's opening: the next token names a country."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": item.question(intent)}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer(f"{text}{item.city} is in")["input_ids"]


def last_states(model, tokenizer, items: list[Item], intent: str) -> torch.Tensor:
    """(items, layers, hidden): each block's output at the answer position."""
    rows = []
    for item in items:
        ids = torch.tensor([answer_position_prompt(tokenizer, item, intent)])
        states = model(ids, output_hidden_states=True).hidden_states[1:]
        rows.append(torch.stack([h[0, -1] for h in states]))
    return torch.stack(rows).float()


@contextmanager
def knob(model, layer: int, direction: torch.Tensor, coordinate: float) -> Iterator[None]:
    """Set the last position's coordinate along `direction` after block `layer` (the server's
    clamp mode, there applied from the last prompt position on)."""

    def clamp(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output  # (1, T, H)
        last = hidden[:, -1]
        hidden[:, -1] = last + (coordinate - last @ direction).unsqueeze(-1) * direction
        return output

    handle = model.model.layers[layer].register_forward_hook(clamp)
    try:
        yield
    finally:
        handle.remove()


def log_odds(model, tokenizer, items: list[Item], intent: str) -> float:
    """Mean log P(claimed country) - log P(true country) at the answer position."""
    total = 0.0
    for item in items:
        ids = torch.tensor([answer_position_prompt(tokenizer, item, intent)])
        logp = model(ids).logits[0, -1].float().log_softmax(-1)
        claimed, true = (tokenizer(f" {c}")["input_ids"][0] for c in (item.claimed,
                                                                        item.country))
        total += (logp[claimed] - logp[true]).item()
    return total / len(items)


def scan(model, tokenizer, data: dict[str, list[Item]]) -> tuple[list[dict], torch.Tensor]:
    context = last_states(model, tokenizer, data["train"], "context")  # (N, L, H)
    prior = last_states(model, tokenizer, data["train"], "prior")  # (N, L, H)
    directions = (context - prior).mean(0)  # (L, H)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    rows = []
    for layer in range(directions.shape[0]):
        u = directions[layer]
        at_context, at_prior = (context[:, layer] @ u).mean().item(), (
            prior[:, layer] @ u).mean().item()
        gap = at_context - at_prior
        sides = {"prior_side": at_prior - SIDE * gap, "context_side": at_context + SIDE * gap}
        odds = {}
        for side, coordinate in sides.items():
            with knob(model, layer, u, coordinate):
                odds[side] = log_odds(model, tokenizer, data["dev"], "none")
        rows.append({"layer": layer, "prior_mean": at_prior, "context_mean": at_context,
                     **sides, "log_odds": odds,
                     "swing": odds["context_side"] - odds["prior_side"]})
        print(f"layer {layer:2d}: gap {gap:7.2f}  log-odds {odds['prior_side']:6.2f} -> "
              f"{odds['context_side']:6.2f}", flush=True)
    return rows, directions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(EMBEDDED_MODEL_NAME, dtype="float32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    data = split(args.seed)
    with torch.no_grad():
        unsteered = {intent: log_odds(model, tokenizer, data["dev"], intent)
                     for intent in ("context", "none", "prior")}
        print(f"unsteered dev log-odds by instruction: {unsteered}", flush=True)
        rows, directions = scan(model, tokenizer, data)
    best = max(rows, key=lambda row: row["swing"])
    layer = best["layer"]
    save_safetensors(SteeringVector("context_knob", {layer: directions[layer].contiguous()},
                                    directions.shape[1], model=EMBEDDED_MODEL_NAME,
                                    method="mean_diff"), args.out)
    summary = {"vector": "context_knob", "model": EMBEDDED_MODEL_NAME, "layer": layer,
               "mode": "clamp", "apply_to": "generation",
               "coordinates": {"prior_mean": best["prior_mean"],
                               "context_mean": best["context_mean"],
                               "prior_side": best["prior_side"],
                               "context_side": best["context_side"]},
               "unsteered_dev_log_odds": unsteered, "scan": rows,
               "settings": {"seed": args.seed, "side": SIDE,
                            "train": len(data["train"]), "dev": len(data["dev"])}}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"layer {layer}: wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
