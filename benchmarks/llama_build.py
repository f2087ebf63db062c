#!/usr/bin/env python
"""Build llama.cpp's `llama-server` once, from the llama-cpp-python source distribution on PyPI
(no other registry is reachable here), cached outside the repository.

    .venv/bin/python benchmarks/llama_build.py [--cache ~/.cache/steerserve/llama.cpp]

Prints the binary's path. About ten minutes on two cores the first time; instant afterwards.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "steerserve" / "llama.cpp"


def log(message: str) -> None:
    print(f"[llama-build] {message}", file=sys.stderr, flush=True)


def existing(cache: Path) -> Path | None:
    found = sorted(cache.glob("*/vendor/llama.cpp/build/bin/llama-server"))
    return found[-1] if found else None


def download(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    log("downloading the llama-cpp-python source distribution (pip)")
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
                    "--no-deps", "--quiet", "-d", str(cache), "llama-cpp-python"], check=True)
    archive = sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]
    root = cache / archive.name.removesuffix(".tar.gz")
    if not root.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    return root / "vendor" / "llama.cpp"


def build(source: Path, jobs: int) -> Path:
    log(f"building llama-server in {source} (cmake, -j{jobs}; ~10 minutes on two cores)")
    subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF"],
                   cwd=source, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-server", f"-j{jobs}"],
                   cwd=source, check=True, stdout=subprocess.DEVNULL)
    return source / "build" / "bin" / "llama-server"


def llama_server(cache: Path = DEFAULT_CACHE, jobs: int = 2) -> Path:
    return existing(cache) or build(download(cache), jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    print(llama_server(args.cache.expanduser(), args.jobs))


if __name__ == "__main__":
    main()
