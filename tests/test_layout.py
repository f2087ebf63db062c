"""The layout shows the architecture and stays installable: a plain src layout with one
`steerserve` package over the design card's folders, found by setuptools without a hand-kept
list, and no collision with Hugging Face's `kernels` or AdapterHub's `adapters`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "src" / "steerserve"
FOLDERS = ("server", "decoding", "kernels", "adapters")


def run_elsewhere(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Python in a directory outside the repository, so only the installed package counts."""
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                          text=True, timeout=120, env=env)


def test_the_design_card_folders_are_subpackages_and_nothing_else_is_top_level():
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(FOLDERS)
    assert not any((REPO / folder).exists() for folder in FOLDERS)


def test_every_package_is_importable_from_an_installed_copy():
    names = sorted("steerserve." + ".".join(init.parent.relative_to(PACKAGE).parts)
                   for folder in FOLDERS for init in (PACKAGE / folder).rglob("__init__.py"))
    result = run_elsewhere("import importlib, sys\n"
                           f"for name in {names!r}: importlib.import_module(name)\n")
    assert result.returncode == 0, result.stderr


def test_the_distribution_claims_only_the_steerserve_name():
    result = run_elsewhere(
        "import importlib.metadata as m, json\n"
        "names = sorted(k for k, v in m.packages_distributions().items() if 'steerserve' in v)\n"
        "print(json.dumps(names))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '["steerserve"]'


def test_transformers_does_not_take_us_for_hugging_face_kernels():
    result = run_elsewhere(
        "import importlib.util, sys\n"
        "if importlib.util.find_spec('kernels') is not None: sys.exit(3)\n"
        "from transformers.utils import is_kernels_available\n"
        "assert not is_kernels_available()")
    if result.returncode == 3:
        pytest.skip("a real `kernels` distribution is installed here")
    assert result.returncode == 0, result.stderr


def test_other_kernels_and_adapters_packages_do_not_shadow_ours(tmp_path):
    """Ours stays `steerserve.kernels`/`steerserve.adapters` beside top-level packages of those
    names: the real distribution where one is installed (transformers now needs `kernels`),
    a stand-in otherwise."""
    for name in ("kernels", "adapters"):
        probe = run_elsewhere(f"import importlib.util; assert importlib.util.find_spec({name!r})")
        if probe.returncode != 0:
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text("__version__ = '9.9'\n")
    result = run_elsewhere(
        "import torch, adapters, kernels\n"
        "from steerserve.server.app import create_app\n"
        "from steerserve.kernels.steering import ops\n"
        "from steerserve.kernels.steering.ops import steer_residual\n"
        f"assert ops.__file__.startswith({str(PACKAGE)!r})\n"
        f"assert not any(m.__file__.startswith({str(PACKAGE)!r}) for m in (adapters, kernels))\n"
        "h = torch.zeros(1, 1, 4)\n"
        "steer_residual(h, torch.ones(1, 4), torch.zeros(1, 1, dtype=torch.int32),\n"
        "               torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int8),\n"
        "               torch.zeros(1, dtype=torch.bool))\n"
        "assert h.flatten().tolist() == [1.0] * 4\n",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr


def test_the_server_reaches_the_engine_only_through_its_facade():
    """`server/` imports `steerserve.decoding.engine` itself, never one of its modules."""
    inner = []
    for path in (PACKAGE / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module \
                    and node.module.startswith("steerserve.decoding.engine."):
                inner.append(f"{path.relative_to(PACKAGE)}: {node.module}")
    assert not inner
