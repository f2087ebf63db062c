#!/usr/bin/env python
"""What structured outputs cost: the grammar mask per step, and constrained against plain
decoding, in the engine and through HTTP.

    .venv/bin/python benchmarks/structured_bench.py [--batches 1,32,64] [--concurrency 32]

1. In the engine (SmolLM2, the server's dtype): per step, the mask alone (every row's
   llguidance bitmask filled and unpacked: `grammar_mask`) and whole steps of a batch where
   every row is constrained against the same batch plain, rounds interleaved, medians.
2. Through a server at --concurrency: streamed chat, 64 tokens each, plain against every
   request constrained and against a quarter constrained (best of rounds, interleaved).
The schema is an array of at least 40 small objects, so no document ends before the token
budget and every step has its full batch. Not a test: minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cases import numbered_bodies, ratio_table, run_interleaved  # noqa: E402
from bench_servers import ManagedServer, free_port  # noqa: E402

from steerserve.decoding.engine.core import Engine, EngineConfig  # noqa: E402
from steerserve.decoding.methods.plain import Plain  # noqa: E402
from steerserve.decoding.model.info import ModelInfo  # noqa: E402
from steerserve.decoding.model.loader import load_model  # noqa: E402
from steerserve.decoding.request import EngineRequest, LaneSpec  # noqa: E402
from steerserve.decoding.sampling.grammar import grammar_mask  # noqa: E402
from steerserve.decoding.sampling.params import SamplingParams  # noqa: E402
from steerserve.server.translate.structured import (  # noqa: E402
    JSON_LAYOUT,
    Constraint,
    GrammarCache,
)

REPO = Path(__file__).resolve().parent.parent
MODEL = "SmolLM2-135M-Instruct"
ROWS = {"type": "array", "minItems": 40, "maxItems": 60, "items": {
    "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                     "age": {"type": "integer"},
                                     "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "role"], "additionalProperties": False}}
STEPS = 24


def compile_rows(loaded):
    import llguidance
    info = ModelInfo.of(loaded, loaded.model.config.vocab_size)
    grammar_text = llguidance.LLMatcher.grammar_from_json_schema(ROWS, defaults=JSON_LAYOUT)
    return GrammarCache().compile(info, Constraint(grammar_text, "bench"))


def mask_ms(grammar, tokenizer, batch: int, width: int) -> float:
    """Median time of `grammar_mask` for `batch` rows walking a valid document."""
    document = "[" + ", ".join('{"name": "Ada", "age": 36, "role": "admin"}'
                               for _ in range(45)) + "]"
    tokens = tokenizer(document)["input_ids"][:STEPS * 2]
    states = [grammar.start() for _ in range(batch)]
    times = []
    for token in tokens:
        start = time.perf_counter()
        grammar_mask(states, width, torch.device("cpu"))
        times.append(time.perf_counter() - start)
        for state in states:
            state.advance(token)
    return statistics.median(times) * 1000


def step_ms(engine: Engine, prompts: list[list[int]], grammar) -> float:
    """Median decode step of the whole batch (steps before every row has its first token
    are prefill and not counted)."""
    started: set[str] = set()
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True,
                                grammar=grammar)
        lane = LaneSpec(engine.primary.name, tuple(prompt))
        engine.submit(EngineRequest(f"r{i}", tuple(prompt), params, Plain((lane,))),
                      lambda output: started.add(output.request_id))
    times = []
    while engine.has_work():
        decoding = len(started) == len(prompts)
        start = time.perf_counter()
        engine.step()
        if decoding and engine.num_running == len(prompts):
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_table(batches: list[int], rounds: int) -> str:
    loaded = load_model(MODEL, max_model_len=1024)
    grammar = compile_rows(loaded)
    engine = Engine(loaded, EngineConfig(max_num_seqs=max(batches)))
    tokenizer = loaded.tokenizer
    width = loaded.model.config.vocab_size
    rows = ["| batch | mask alone ms | plain step ms | constrained step ms | ratio |",
            "|---|---|---|---|---|"]
    with torch.inference_mode():
        for batch in batches:
            prompts = [tokenizer.apply_chat_template(
                [{"role": "user", "content": f"List {batch + i} people as JSON."}],
                add_generation_prompt=True, return_dict=False) for i in range(batch)]
            plain, constrained = [], []
            for _ in range(rounds):
                plain.append(step_ms(engine, prompts, None))
                constrained.append(step_ms(engine, prompts, grammar))
            p, c = statistics.median(plain) * 1000, statistics.median(constrained) * 1000
            rows.append(f"| {batch} | {mask_ms(grammar, tokenizer, batch, width):.2f} | "
                        f"{p:.1f} | {c:.1f} | {c / p:.3f}x |")
    return "\n".join(rows)


def bodies(share: float, max_tokens: int):
    """Of every four requests, `share` of them constrained to ROWS."""
    constrained = {"response_format": {"type": "json_schema",
                                       "json_schema": {"name": "rows", "schema": ROWS}}}
    return numbered_bodies(MODEL, max_tokens,
                           lambda i: constrained if (i % 4) < share * 4 else {})


def serving_table(concurrency: int, max_tokens: int, repeats: int) -> str:
    port = free_port()
    command = [str(REPO / ".venv/bin/steerserve"), "serve", "--port", str(port),
               "--log-level", "warning", "--vectors-dir", "none"]
    cases = {"plain": lambda: bodies(0.0, max_tokens),
             "a quarter constrained": lambda: bodies(0.25, max_tokens),
             "all constrained": lambda: bodies(1.0, max_tokens)}
    with ManagedServer("steerserve", command, port, REPO / ".bench" / "logs" / "structured.log",
                       env={}, unset_env=("STEERSERVE_API_KEY",)) as server:
        server.wait_healthy(600)
        best = run_interleaved(f"{server.base_url}/v1/chat/completions", cases, concurrency,
                               repeats)
    return ratio_table(best, f"case ({concurrency} concurrent x {max_tokens} tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed HTTP rounds (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(engine_table([int(b) for b in args.batches.split(",")], args.rounds), flush=True)
    print()
    print(serving_table(args.concurrency, args.max_tokens, args.repeats))


if __name__ == "__main__":
    main()
