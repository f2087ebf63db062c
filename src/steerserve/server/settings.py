"""Server settings: one frozen dataclass built by the CLI (or by tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    model: str = "SmolLM2-135M-Instruct"
    served_model_name: str | None = None
    extra_models: tuple[tuple[str, str], ...] = ()  # (name, path): more hosted models
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = 4096
    max_num_seqs: int = 64
    max_queue: int = 512
    max_prefill_tokens: int = 512
    forward: str = "auto"  # auto | fused | hf
    packed_weights: bool = True  # projections on oneDNN-packed copies (CPU)
    compile_decode: bool = False  # decode batches as one inductor graph (model/compiled.py)
    prefix_cache_slots: int = 8
    max_n: int = 16
    max_stop: int = 16
    max_body_bytes: int = 4 * 1024 * 1024
    api_key: str | None = None
    admin_key: str | None = None  # admin routes (adapters, vector writes); None: the API key
    allow_runtime_vectors: bool = False  # POST / DELETE /v1/steering/vectors
    allowed_origins: tuple[str, ...] = ()  # CORS: pages on these origins may call the API
    allowed_hosts: tuple[str, ...] = ()  # Host values accepted besides loopback names
    drain_timeout: float = 30.0  # seconds SIGTERM waits for requests in flight
    allow_request_chat_template: bool = False
    in_context_alignment: str = "none"  # none | urial: chat's default rendering
    tool_call_parser: str = "auto"  # auto | hermes | llama3_json
    threads: int | None = None
    loras: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start
    adapter_dir: str | None = None  # root that runtime lora_path values are confined to
    allow_runtime_lora: bool = False
    max_loras: int = 8
    max_lora_rank: int = 16
    steering_vectors: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start
    temperature_heads: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start
    deferral_heads: tuple[tuple[str, str], ...] = ()  # (name, path): Co-LLM's heads
    routers: tuple[tuple[str, str], ...] = ()  # (name, directory): ELREA's routers
    saes: tuple[tuple[str, str], ...] = ()  # (name, SAELens directory) loaded at start
    vectors_dir: str | None = "~/.local/share/steerserve/vectors"  # None: in memory only
    shared_store: str | None = None  # replicas' common vectors, runtime adapters and heads
    log_level: str = "info"

    @property
    def lora_enabled(self) -> bool:
        return bool(self.loras) or self.allow_runtime_lora

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
