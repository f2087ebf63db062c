"""The command line: every option of `steerserve serve` and `steerserve ray`, with its help."""

from __future__ import annotations

import argparse

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
    add_server_options(serve)
    ray = commands.add_parser(
        "ray", help="serve N replicas behind Ray Serve's HTTP proxy (pip install "
        "'steerserve[ray]')", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Start (or join) a Ray cluster and serve the same API from N replicas of "
        "the server, each with its own engine; give them a --shared-store so vectors, runtime "
        "adapters and temperature heads are the same on every replica (docs/scale-out.md).")
    add_server_options(ray)
    add_ray_options(ray)
    return parser


def add_server_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_engine_options(parser)
    add_lora_options(parser)
    add_steering_options(parser)
    add_sae_options(parser)
    add_temperature_options(parser)
    add_method_options(parser)
    add_http_options(parser)
    parser.add_argument_group("scale-out").add_argument(
        "--shared-store", default=None, metavar="DIR",
        help="a directory every replica mounts (shared storage): extracted vectors are saved "
        "in DIR/vectors (instead of --vectors-dir), runtime adapter loads are recorded in "
        "DIR/loras, temperature heads are read from DIR/heads, and each replica catches up "
        "with all three before every request")


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ray serve")
    group.add_argument("--num-replicas", type=int, default=2,
                       help="replicas of the server (each loads the models and runs its own "
                       "engine); --host/--port are those of Ray Serve's HTTP proxy")
    group.add_argument("--replica-cpus", type=float, default=1.0,
                       help="CPUs Ray reserves per replica; also the replica's torch "
                       "threads unless --threads is given")
    group.add_argument("--replica-gpus", type=float, default=0.0,
                       help="GPUs Ray reserves per replica")
    group.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (e.g. 'auto' on a node of a running "
                       "cluster); unset: start a local one that stops with this process")


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
                       help="the model's forward: 'fused' is steerserve's own for Llama, Mistral, "
                       "Qwen2/3 and Gemma 1/2/3 (fused QKV and gate/up weights, SDPA over the "
                       "slot cache; in a decode step up to 8 rows much longer than the rest "
                       "attend alone over their own length), 'hf' the Hugging Face modules "
                       "(any other decoder, slower); auto = fused where the architecture "
                       "allows")
    group.add_argument("--packed-weights", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS.packed_weights,
                       help="run the projections and the LM head on copies of their weights "
                       "packed once for oneDNN (CPU, fp32/bf16): about 2x faster matmuls at "
                       "small batches, for a second copy of those weights in memory")
    group.add_argument("--compile-decode", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS.compile_decode,
                       help="compile the decode forward with torch.compile (inductor, "
                       "weights frozen, its C++ wrapper) at every start: about 110-130 s on two "
                       "cores (up to 300 s on slower ones), 220-310 s with LoRA slots "
                       "(--max-loras; 500 s on slower ones), whose graph takes "
                       "every batch's adapters. "
                       "Decode batches run it, adapter rows, DoLa's early exits and added "
                       "steering vectors included (12-24%% faster steps on two cores); "
                       "batches with other steering edits stay eager (logged once, with "
                       "the reason), and so do batches whose few long rows, read alone, save "
                       "more keys than the eager step costs. Llama, Mistral and "
                       "Qwen2 without sliding windows, and a C++ compiler (g++); another "
                       "packed copy of the weights in memory")
    group.add_argument("--prefix-cache-slots", type=int, default=DEFAULTS.prefix_cache_slots,
                       help="KV-cache slots that keep recent prompts (each slot as many as "
                       "fit, up to 16): a request whose prompt starts like one of them (a "
                       "system prompt, few-shot examples, earlier turns) prefills only the "
                       "rest; 0 turns the prefix cache off")
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


def add_sae_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sparse autoencoders")
    group.add_argument("--sae", action="append", default=[], metavar="NAME=DIR",
                       help="load a sparse autoencoder in SAELens's layout (DIR with cfg.json "
                       "and sae_weights.safetensors) at start (repeatable); requests steer "
                       "by its features with {\"sae\": NAME, \"feature\": i, \"scale\": s} "
                       "(or \"clamp\": v) in 'steering', and /v1/saes/NAME/... shows where "
                       "features fire (see examples/train_sae.py)")


def add_temperature_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adaptive temperature")
    group.add_argument("--temperature-head", action="append", default=[], metavar="NAME=PATH",
                       help="load a learned temperature head (.safetensors, see "
                       "examples/train_temperature_head.py) at start (repeatable); requests "
                       "use it with {\"adaptive_temperature\": {\"method\": \"learned\", "
                       "\"head\": NAME}}")


def add_method_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding methods' files")
    group.add_argument("--router", action="append", default=[], metavar="NAME=DIR",
                       help="load a routed-experts router (a directory with router."
                       "safetensors and feature-adapter/, see examples/train_routed_experts"
                       ".py; its experts must be served with --lora) at start (repeatable); "
                       "requests use it with {\"decoding\": {\"method\": \"routed_experts\","
                       " \"router\": NAME}}; keeps a float32 copy of the model for routing "
                       "(docs/decoding.md)")
    group.add_argument("--deferral-head", action="append", default=[], metavar="NAME=PATH",
                       help="load a Co-LLM deferral head (.safetensors, see "
                       "examples/train_deferral_head.py) at start (repeatable); requests use "
                       "it with {\"decoding\": {\"method\": \"collaborative\", "
                       "\"assistants\": [...], \"head\": NAME}} (docs/decoding.md)")


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
    group.add_argument("--in-context-alignment", default=DEFAULTS.in_context_alignment,
                       choices=["none", "urial"],
                       help="how chat requests are rendered by default: none (the model's own "
                       "chat template), urial (a constant prefix of instructions and three "
                       "examples that lets a base model answer chat; a request's "
                       "'in_context_alignment' field overrides it; docs/alignment.md)")
    group.add_argument("--tool-call-parser", default=DEFAULTS.tool_call_parser,
                       choices=["auto", "hermes", "llama3_json"],
                       help="how tool calls are written and read: hermes (<tool_call> JSON "
                       "blocks, Qwen's and the default), llama3_json (bare JSON with "
                       "'parameters'); auto picks llama3_json for a template with Llama 3's "
                       "<|python_tag|>, else hermes (docs/structured-outputs.md)")
    group.add_argument("--log-level", default=DEFAULTS.log_level,
                       choices=["debug", "info", "warning", "error"], help="log verbosity")
