"""How often SmolLM2's answer follows a counterfactual context, at each setting of the
context-sensitivity knob, through a running server.

    steerserve serve --steering-vector context_knob=examples/steering/context_knob.safetensors &
    .venv/bin/python examples/eval_context_knob.py [--url http://127.0.0.1:8000]

On the held-out cities of examples/context_knob_data.py ("Context: Paris is in Japan.
Question: Which country is Paris in?", asked with no instruction), greedy chat answers with
the knob's coordinate clamped (`"mode": "clamp"`, from the answer's first token on) at
settings from the prior side to the context side, in units of the gap between the two
intents' means (examples/steering/context_knob.json); and, for reference, unsteered with the
explicit instructions. Each answer is sorted by the country it names first: the context's,
the prior's, or neither. Prints a markdown table (and --json writes the rows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from context_knob_data import Item, split  # noqa: E402

KNOB = Path(__file__).resolve().parent / "steering" / "context_knob.json"
SETTINGS = (-3.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0)  # prior mean + k * gap


def ask(client: httpx.Client, url: str, model: str, item: Item, intent: str,
        coordinate: float | None) -> str:
    body = {"model": model, "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": item.question(intent)}]}
    if coordinate is not None:
        body["steering"] = [{"vector": "context_knob", "mode": "clamp", "scale": coordinate,
                             "apply_to": "generation"}]
    reply = client.post(f"{url}/v1/chat/completions", json=body)
    reply.raise_for_status()
    return reply.json()["choices"][0]["message"]["content"]


def rates(client: httpx.Client, url: str, model: str, items: list[Item], intent: str,
          coordinate: float | None) -> dict[str, float]:
    sides = [item.follows(ask(client, url, model, item, intent, coordinate)) for item in items]
    return {side: sides.count(side) / len(sides) for side in ("context", "prior", "neither")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--knob", type=Path, default=KNOB, help="the finder's JSON")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    knob = json.loads(args.knob.read_text())
    prior, context = (knob["coordinates"][k] for k in ("prior_mean", "context_mean"))
    items = split(knob["settings"]["seed"])["held_out"]
    cases = [("unsteered, told to use the context", "context", None, None),
             ("unsteered, told to use prior knowledge", "prior", None, None),
             ("unsteered, no instruction", "none", None, None)]
    cases += [(f"knob at prior mean {k:+g} gaps", "none", k, prior + k * (context - prior))
              for k in SETTINGS]
    rows = []
    print(f"{len(items)} held-out cities, knob at layer {knob['layer']} (prior mean "
          f"{prior:.1f}, context mean {context:.1f})\n")
    print("| setting | coordinate | follows context | follows prior | neither |")
    print("|---|---|---|---|---|")
    with httpx.Client(timeout=120) as client:
        for label, intent, k, coordinate in cases:
            result = rates(client, args.url, args.model, items, intent, coordinate)
            rows.append({"setting": label, "gaps": k, "coordinate": coordinate, **result})
            shown = "" if coordinate is None else f"{coordinate:.1f}"
            print(f"| {label} | {shown} | {result['context']:.2f} | {result['prior']:.2f} | "
                  f"{result['neither']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
