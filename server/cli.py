"""`steerserve serve ...`: load the model (with progress), then serve over HTTP."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from steerserve.server.settings import ServerSettings

DEFAULTS = ServerSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steerserve", description="OpenAI-compatible server that steers language models "
        "at decoding time.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="load a model and serve the OpenAI API",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Load a model and serve /v1/chat/completions, /v1/completions, "
        "/v1/models, /v1/steering/vectors, /health and /metrics.")
    add_model_options(serve)
    add_engine_options(serve)
    add_lora_options(serve)
    add_steering_options(serve)
    add_temperature_options(serve)
    add_http_options(serve)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", action="append", default=[], metavar="[NAME=]PATH",
                       help="a model to host (repeatable; the first is the default and carries "
                       "the LoRA adapters; several are for multi-model decoding such as "
                       "proxy-tuning): the embedded model's name (SmolLM2-135M-Instruct, the "
                       "default), a Hugging Face model "
                       "directory with safetensors weights, or a .gguf file")
    group.add_argument("--served-model-name", default=None,
                       help="name clients put in 'model' (default: derived from --model)")
    group.add_argument("--dtype", default=DEFAULTS.dtype,
                       choices=["auto", "float32", "bfloat16", "float16"],
                       help="weight and activation dtype; auto = bfloat16 on GPUs and on CPUs with "
                       "native bf16 (AVX512-BF16/AMX), float32 on other CPUs, where bf16 "
                       "measured 4x slower (docs/benchmarks.md)")
    group.add_argument("--device", default=DEFAULTS.device,
                       help="torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1")
    group.add_argument("--max-model-len", type=int, default=DEFAULTS.max_model_len,
                       help="context length (prompt + completion) per sequence; capped by the "
                       "model's own limit; sizes the KV cache")


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--max-num-seqs", type=int, default=DEFAULTS.max_num_seqs,
                       help="KV-cache slots: sequences decoded together in one batch")
    group.add_argument("--max-queue", type=int, default=DEFAULTS.max_queue,
                       help="waiting sequences beyond which requests get HTTP 429")
    group.add_argument("--max-prefill-tokens", type=int, default=DEFAULTS.max_prefill_tokens,
                       help="padded prompt tokens prefilled per step; longer prompts are "
                            "prefilled in chunks of this size beside the running decodes "
                            "(bounds their stalls)")
    group.add_argument("--max-n", type=int, default=DEFAULTS.max_n,
                       help="largest 'n' (choices per request) accepted")
    group.add_argument("--max-stop", type=int, default=DEFAULTS.max_stop,
                       help="largest number of stop strings per request")
    group.add_argument("--forward", default=DEFAULTS.forward, choices=["auto", "fused", "hf"],
                       help="the model's forward: 'fused' is steerserve's own for the Llama "
                       "family (fused QKV and gate/up weights, SDPA over the slot cache), 'hf' "
                       "the Hugging Face modules; auto = fused where the architecture allows")
    group.add_argument("--prefix-cache-slots", type=int, default=DEFAULTS.prefix_cache_slots,
                       help="KV-cache slots that keep recent prompts: a request whose prompt "
                       "starts like one of them (a system prompt, few-shot examples, earlier "
                       "turns) prefills only the rest; 0 turns the prefix cache off")
    group.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice, one per core)")


def add_lora_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA adapters")
    group.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                       help="load a PEFT LoRA adapter at start (repeatable); clients select it "
                       "with \"model\": NAME. A relative PATH is taken under --adapter-dir")
    group.add_argument("--adapter-dir", default=None,
                       help="adapter root: runtime lora_path values must resolve inside it "
                       "(symlinks followed)")
    group.add_argument("--allow-runtime-lora", action="store_true",
                       help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                       "(admin: needs --admin-key when one is set, else --api-key)")
    group.add_argument("--max-loras", type=int, default=DEFAULTS.max_loras,
                       help="adapters resident at once (slots); the least recently used idle "
                       "adapter is evicted when a new one is needed")
    group.add_argument("--max-lora-rank", type=int, default=DEFAULTS.max_lora_rank,
                       help="largest adapter rank accepted (slot weights are padded to it)")


def add_steering_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("activation steering")
    group.add_argument("--steering-vector", action="append", default=[], metavar="NAME=PATH",
                       help="load a steering (control) vector at start (repeatable): a "
                       "llama.cpp/repeng control-vector .gguf or a .safetensors with "
                       "direction.N tensors; requests use it as {\"vector\": NAME}")
    group.add_argument("--allow-runtime-vectors", action="store_true",
                       help="enable POST /v1/steering/vectors (extraction) and DELETE (admin; "
                       "guarded by --admin-key or --api-key when set)")
    group.add_argument("--vectors-dir", default=DEFAULTS.vectors_dir,
                       help="directory where POST /v1/steering/vectors saves extracted vectors "
                       "(as NAME.safetensors) and from which they are reloaded at start; "
                       "'none' keeps extracted vectors in memory only")


def add_temperature_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adaptive temperature")
    group.add_argument("--temperature-head", action="append", default=[], metavar="NAME=PATH",
                       help="load a learned temperature head (.safetensors, see "
                       "examples/train_temperature_head.py) at start (repeatable); requests "
                       "use it with {\"adaptive_temperature\": {\"method\": \"learned\", "
                       "\"head\": NAME}}")


def primary_model(values: list[str]) -> str:
    first = values[0] if values else DEFAULTS.model
    name, sep, path = first.partition("=")
    return path if sep and name and path else first


def served_name(args: argparse.Namespace) -> str | None:
    """--served-model-name, else the NAME of a first --model NAME=PATH."""
    if args.served_model_name or not args.model:
        return args.served_model_name
    name, sep, path = args.model[0].partition("=")
    return name if sep and name and path else None


def parse_named_paths(values: list[str], flag: str, root: str | None = None,
                      named: bool = True) -> tuple[tuple[str, str], ...]:
    """NAME=PATH values; with named=False a bare PATH is named after the model."""
    from steerserve.decoding.model.loader import default_model_name

    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not named and not (sep and name and path):
            name, path = default_model_name(value), value
        elif not sep or not name or not path:
            raise SystemExit(f"{flag} expects NAME=PATH, got '{value}'")
        if root and not Path(path).is_absolute():
            path = str(Path(root) / path)
        pairs.append((name, path))
    return tuple(pairs)


def parse_loras(values: list[str], adapter_dir: str | None) -> tuple[tuple[str, str], ...]:
    return parse_named_paths(values, "--lora", adapter_dir)


def add_http_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("http")
    group.add_argument("--host", default=DEFAULTS.host, help="address to listen on")
    group.add_argument("--port", type=int, default=DEFAULTS.port, help="port to listen on")
    group.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on /v1 routes "
                       "(default: $STEERSERVE_API_KEY; unset = no auth)")
    group.add_argument("--admin-key", default=None,
                       help="a separate key for the admin routes (adapter load/unload, vector "
                       "create/delete); default: $STEERSERVE_ADMIN_KEY, else the API key")
    group.add_argument("--allowed-origins", default="",
                       help="comma-separated origins whose web pages may call the API (CORS, "
                       "e.g. http://localhost:5173); default: none, browsers block them")
    group.add_argument("--allowed-hosts", default="",
                       help="comma-separated Host header values accepted besides 127.0.0.1, "
                       "localhost and ::1 when bound to loopback (DNS-rebinding protection); "
                       "'*' turns the check off")
    group.add_argument("--drain-timeout", type=float, default=DEFAULTS.drain_timeout,
                       help="seconds SIGTERM waits for requests in flight (new ones get 503)")
    group.add_argument("--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes,
                       help="largest request body accepted (HTTP 413 beyond)")
    group.add_argument("--allow-request-chat-template", action="store_true",
                       help="accept a 'chat_template' field in chat requests (off: 400)")
    group.add_argument("--log-level", default=DEFAULTS.log_level,
                       choices=["debug", "info", "warning", "error"], help="log verbosity")


def _csv(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        model=primary_model(args.model), served_model_name=served_name(args),
        extra_models=parse_named_paths(args.model[1:], "--model", named=False), host=args.host,
        port=args.port, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens, max_n=args.max_n, max_stop=args.max_stop,
        forward=args.forward, prefix_cache_slots=args.prefix_cache_slots,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("STEERSERVE_API_KEY") or None,
        admin_key=args.admin_key or os.environ.get("STEERSERVE_ADMIN_KEY") or None,
        allow_runtime_vectors=args.allow_runtime_vectors,
        allowed_origins=_csv(args.allowed_origins), allowed_hosts=_csv(args.allowed_hosts),
        drain_timeout=args.drain_timeout,
        allow_request_chat_template=args.allow_request_chat_template, threads=args.threads,
        log_level=args.log_level, loras=parse_loras(args.lora, args.adapter_dir),
        adapter_dir=args.adapter_dir, allow_runtime_lora=args.allow_runtime_lora,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        steering_vectors=parse_named_paths(args.steering_vector, "--steering-vector"),
        temperature_heads=parse_named_paths(args.temperature_head, "--temperature-head"),
        vectors_dir=None if args.vectors_dir.lower() == "none" else args.vectors_dir)


def build_off_main(settings: ServerSettings):
    """Load the models and build the context in a thread of its own that then exits.

    OpenMP keeps a team of worker threads for every thread that ran a parallel torch op. If
    the main thread loaded the models, its team would stay beside the engine thread's and the
    two would contend for the cores: a decode step measured 1.6x slower that way
    (docs/benchmarks.md). A thread that exits takes its team with it, so only the engine
    thread's remains.
    """
    import threading

    from steerserve.decoding.model.loader import load_model
    from steerserve.server.app import build_context

    built: dict = {}

    def build() -> None:
        try:
            model = load_model(settings.model, name=settings.served_model_name,
                               dtype=settings.dtype, device=settings.device,
                               max_model_len=settings.max_model_len)
            others = [load_model(path, name=name, dtype=settings.dtype, device=settings.device,
                                 max_model_len=settings.max_model_len)
                      for name, path in settings.extra_models]
            built["ctx"] = build_context(settings, model, others)
        except BaseException as exc:  # re-raised in the main thread
            built["error"] = exc

    loader = threading.Thread(target=build, name="steerserve-load")
    loader.start()
    loader.join()
    if "error" in built:
        raise built["error"]
    return built["ctx"]


def serve(settings: ServerSettings) -> None:
    from steerserve.server.app import create_app
    from steerserve.server.serving import DrainingServer, uvicorn_config

    ctx = build_off_main(settings)
    logging.getLogger(__name__).info("serving '%s' on http://%s:%d/v1", ctx.model_name,
                                     settings.host, settings.port)
    DrainingServer(uvicorn_config(create_app(ctx), settings), ctx.draining).run()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(settings_from_args(args))


if __name__ == "__main__":
    main()
