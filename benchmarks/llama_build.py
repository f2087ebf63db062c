#!/usr/bin/env python
"""Build llama.cpp's `llama-server` once, from the llama-cpp-python source distribution on PyPI
(no other registry is reachable here), cached outside the repository.

    .venv/bin/python benchmarks/llama_build.py [--cache ~/.cache/steerserve/llama.cpp]

Prints the binary's path. About ten minutes on two cores the first time; instant afterwards.
Built with GGML_NATIVE=OFF and the instruction sets this CPU reports (/proc/cpuinfo), named
one by one: `-march=native` built binaries that died with SIGILL on this machine kind. The
cache is keyed by those flags, so a machine with other ones builds its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "steerserve" / "llama.cpp"

# /proc/cpuinfo flag -> ggml's CMake option for it
GGML_ISA = {
    "avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16", "amx_tile": "GGML_AMX_TILE", "amx_int8": "GGML_AMX_INT8",
    "amx_bf16": "GGML_AMX_BF16",
}


def log(message: str) -> None:
    print(f"[llama-build] {message}", file=sys.stderr, flush=True)


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def isa_options(flags: set[str]) -> list[str]:
    """Every ggml instruction-set option, ON exactly where the CPU has the instructions."""
    return [f"-D{option}={'ON' if flag in flags else 'OFF'}"
            for flag, option in sorted(GGML_ISA.items())]


def build_name(options: list[str]) -> str:
    """The build folder for these options: a machine with other flags builds its own."""
    on = [option[2:].removesuffix("=ON").removeprefix("GGML_").lower()
          for option in options if option.endswith("=ON")]
    return "build-" + ("-".join(on) or "generic")


def existing(cache: Path, build_dir: str) -> Path | None:
    found = sorted(cache.glob(f"*/vendor/llama.cpp/{build_dir}/bin/llama-server"))
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


def build(source: Path, jobs: int, options: list[str]) -> Path:
    build_dir = build_name(options)
    log(f"building llama-server in {source / build_dir} (cmake, -j{jobs}; ~10 minutes on two "
        f"cores) with GGML_NATIVE=OFF {' '.join(options)}")
    subprocess.run(["cmake", "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DGGML_NATIVE=OFF", *options],
                   cwd=source, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", build_dir, "--target", "llama-server", f"-j{jobs}"],
                   cwd=source, check=True, stdout=subprocess.DEVNULL)
    return source / build_dir / "bin" / "llama-server"


def llama_server(cache: Path = DEFAULT_CACHE, jobs: int = 2) -> Path:
    options = isa_options(cpu_flags())
    return existing(cache, build_name(options)) or build(download(cache), jobs, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    print(llama_server(args.cache.expanduser(), args.jobs))


if __name__ == "__main__":
    main()
