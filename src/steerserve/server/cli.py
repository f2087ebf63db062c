"""`steerserve serve ...` / `steerserve ray ...`: turn the options into settings, load the
model (with progress), then serve over HTTP (server/options.py holds the options)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from steerserve.server.options import DEFAULTS, build_parser
from steerserve.server.settings import ServerSettings


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
    from steerserve.adapters.names import NAME_RULE, is_valid_name
    from steerserve.decoding.model.loader import default_model_name

    pairs = []
    for value in values:
        name, sep, path = value.partition("=")
        if not named and not (sep and name and path):
            name, path = default_model_name(value), value
        elif not sep or not name or not path:
            raise SystemExit(f"{flag} expects NAME=PATH, got '{value}'")
        elif named and not is_valid_name(name):
            raise SystemExit(f"{flag} {value}: the name must be {NAME_RULE}")
        if root and not Path(path).is_absolute():
            path = str(Path(root) / path)
        pairs.append((name, path))
    return tuple(pairs)


def parse_loras(values: list[str], adapter_dir: str | None) -> tuple[tuple[str, str], ...]:
    return parse_named_paths(values, "--lora", adapter_dir)



def _csv(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(
        model=primary_model(args.model), served_model_name=served_name(args),
        extra_models=parse_named_paths(args.model[1:], "--model", named=False), host=args.host,
        port=args.port, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
        max_prefill_tokens=args.max_prefill_tokens, max_n=args.max_n, max_stop=args.max_stop,
        forward=args.forward, packed_weights=args.packed_weights,
        compile_decode=args.compile_decode,
        prefix_cache_slots=args.prefix_cache_slots,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("STEERSERVE_API_KEY") or None,
        admin_key=args.admin_key or os.environ.get("STEERSERVE_ADMIN_KEY") or None,
        allow_runtime_vectors=args.allow_runtime_vectors,
        allowed_origins=_csv(args.allowed_origins), allowed_hosts=_csv(args.allowed_hosts),
        drain_timeout=args.drain_timeout,
        allow_request_chat_template=args.allow_request_chat_template,
        in_context_alignment=args.in_context_alignment,
        tool_call_parser=args.tool_call_parser, threads=args.threads,
        log_level=args.log_level, loras=parse_loras(args.lora, args.adapter_dir),
        adapter_dir=args.adapter_dir, allow_runtime_lora=args.allow_runtime_lora,
        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        steering_vectors=parse_named_paths(args.steering_vector, "--steering-vector"),
        temperature_heads=parse_named_paths(args.temperature_head, "--temperature-head"),
        deferral_heads=parse_named_paths(args.deferral_head, "--deferral-head"),
        routers=parse_named_paths(args.router, "--router"),
        saes=parse_named_paths(args.sae, "--sae"),
        vectors_dir=None if args.vectors_dir.lower() == "none" else args.vectors_dir,
        shared_store=args.shared_store)


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


def serve_on_ray(args: argparse.Namespace) -> None:
    try:
        from steerserve.server import ray_serve
    except ImportError as exc:
        raise SystemExit(f"steerserve ray needs Ray Serve: pip install 'steerserve[ray]' "
                         f"({exc})") from exc
    if args.num_replicas < 1:
        raise SystemExit("--num-replicas must be at least 1")
    ray_serve.run(settings_from_args(args), args.num_replicas, args.replica_cpus,
                  args.replica_gpus, args.ray_address)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(settings_from_args(args))
    elif args.command == "ray":
        serve_on_ray(args)


if __name__ == "__main__":
    main()
