"""Soak, short: benchmarks/soak.py's checks on a tiny model (the full run, on SmolLM2 with
hundreds of requests, is `.venv/bin/python benchmarks/soak.py`; results in docs/benchmarks.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from tests.support import API_KEY, LiveServer, load_script
from tests.tiny_models import tiny_llama

_soak = load_script("benchmarks/soak.py")
Names, make_jobs, soak = _soak.Names, _soak.make_jobs, _soak.soak


@pytest.fixture(scope="module")
def server(tiny_model_dir, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("soak")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny_llama(len(tokenizer))), config).save_pretrained(
        root / "adapter")
    save_file({f"direction.{layer}": torch.randn(64) for layer in (0, 1)},
              root / "vector.safetensors")
    live = LiveServer(["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--dtype",
                       "float32", "--max-num-seqs", "16", "--lora", f"lora={root / 'adapter'}",
                       "--steering-vector", f"vec={root / 'vector.safetensors'}"],
                      api_key=API_KEY)
    yield live
    live.stop()


def test_soak(server):
    jobs = make_jobs(120, Names("tiny", "lora", "vec"), max_tokens=12)
    report = soak(server.base_url, server.headers(), server.process.pid, jobs, concurrency=16)
    assert report["failures"] == [], report
    assert report["completed"] > 20 and report["left"] > 5, report
