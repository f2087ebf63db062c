"""Evaluate a temperature head against every fixed temperature of its set, on held-out prompts.

Held-out prompts (operand pairs and topics never seen in training, see
`train_temperature_head.task_split`), several samples per prompt, fixed seeds. For each decoding
method (each fixed temperature of the set, the head with sampled choices, the head with greedy
choices; token level) it reports the mean factual reward, the mean open-ended reward, their
mean (the combined reward) and the mean temperature used on each task's tokens.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python examples/eval_temperature_head.py

Prints a markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from train_temperature_head import (  # the script's folder is on sys.path when run directly
    DEFAULT_OUT,
    FACTUAL,
    HEAD_GREEDY,
    HEAD_SAMPLED,
    OPEN,
    OpenReward,
    encode_prompts,
    generate,
    load_lm,
    score_groups,
    summarize,
    task_split,
)

from steerserve.decoding.model.loader import EMBEDDED_MODEL_NAME
from steerserve.decoding.sampling.temperature_head import load_temperature_head


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL_NAME,
                        help="model: the embedded name, an HF directory or a .gguf")
    parser.add_argument("--head", type=Path, default=DEFAULT_OUT,
                        help="the temperature head (.safetensors) to evaluate")
    parser.add_argument("--samples", type=int, default=6, help="samples per prompt and method")
    parser.add_argument("--max-new-tokens", type=int, default=24,
                        help="tokens generated per sample at most")
    parser.add_argument("--seed", type=int, default=0,
                        help="prompt split seed (must match training) and sampling seed")
    parser.add_argument("--split", choices=("heldout", "train"), default="heldout",
                        help="which prompts to evaluate on")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    model, tokenizer = load_lm(args.model)
    head = load_temperature_head(args.head, hidden_size=model.config.hidden_size)
    temps = head.config.temperatures
    train, heldout = task_split(args.seed)
    prompts = heldout if args.split == "heldout" else train
    prompt_ids = encode_prompts(tokenizer, prompts)
    open_reward = OpenReward(tokenizer)
    methods = [(f"fixed T={t:g}", i) for i, t in enumerate(temps)]
    methods += [("head (sampled choice)", HEAD_SAMPLED), ("head (greedy choice)", HEAD_GREEDY)]
    results = {}
    for name, mode in methods:
        started = time.perf_counter()
        # Same seed for every method: differences come from the method, not the draw.
        generator = torch.Generator().manual_seed(args.seed + 1)
        groups = generate(model, tokenizer, prompt_ids, [[mode] * args.samples] * len(prompts),
                          head, temps, args.max_new_tokens, generator)
        rewards = score_groups(prompts, groups, open_reward)
        results[name] = summarize(prompts, groups, rewards, temps)
        results[name]["example_open"] = next(
            g[0].text for p, g in zip(prompts, groups, strict=True) if p.task == OPEN
        )
        print(f"{name}: combined {results[name]['combined']['reward']:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    return {
        "head": str(args.head), "split": args.split, "samples": args.samples,
        "prompts": {task: sum(p.task == task for p in prompts) for task in (FACTUAL, OPEN)},
        "max_new_tokens": args.max_new_tokens, "seed": args.seed, "results": results,
    }


def markdown_table(report: dict) -> str:
    lines = [
        "| decoding | factual reward | open-ended reward | combined | mean T factual "
        "| mean T open-ended |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r[FACTUAL]['reward']:.3f} | {r[OPEN]['reward']:.3f} "
            f"| {r['combined']['reward']:.3f} | {r[FACTUAL]['mean_temperature']:.2f} "
            f"| {r[OPEN]['mean_temperature']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = evaluate(args)
    print()
    print(markdown_table(report))
    results = report["results"]
    fixed = {k: v["combined"]["reward"] for k, v in results.items() if k.startswith("fixed")}
    best_fixed = max(fixed, key=fixed.get)
    for name in ("head (sampled choice)", "head (greedy choice)"):
        gap = results[name]["combined"]["reward"] - fixed[best_fixed]
        print(f"{name} vs best fixed ({best_fixed}): {gap:+.3f} combined reward")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
