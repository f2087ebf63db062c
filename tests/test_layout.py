"""The layout shows the architecture and stays installable: one `steerserve` import namespace
over the design card's folders, every package in pyproject, no module past ~300 lines, and no
collision with Hugging Face's `kernels` or AdapterHub's `adapters`."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FOLDERS = ("server", "decoding", "kernels", "adapters")
MAX_LINES = 300


def run_elsewhere(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Python in a directory outside the repository, so only the installed package counts."""
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                          text=True, timeout=120, env=env)


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {"steerserve." + str(init.parent.relative_to(REPO)).replace("/", ".")
             for folder in FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert listed == found


def test_no_module_is_past_the_limit():
    long = [f"{path.relative_to(REPO)}: {lines}" for folder in FOLDERS
            for path in (REPO / folder).rglob("*.py")
            if (lines := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, long


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
    for name in ("kernels", "adapters"):  # stand-ins for the other distributions
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("__version__ = '9.9'\nOTHER = True\n")
    result = run_elsewhere(
        "import torch, adapters, kernels\n"
        "from steerserve.server.app import create_app\n"
        "from steerserve.kernels.steering import ops\n"
        "from steerserve.kernels.steering.ops import steer_residual\n"
        f"assert ops.__file__.startswith({str(REPO)!r}) and adapters.OTHER and kernels.OTHER\n"
        "h = torch.zeros(1, 1, 4)\n"
        "steer_residual(h, torch.ones(1, 4), torch.zeros(1, 1, dtype=torch.int32),\n"
        "               torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int8),\n"
        "               torch.zeros(1, dtype=torch.bool))\n"
        "assert h.flatten().tolist() == [1.0] * 4\n",
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
