"""The layering is enforced by import-linter (pyproject.toml), and the check has teeth.

Importing the core must not pull in any layer above it; a core module that imports ``calibration``
breaks the layers contract; the statistics never import torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("surrogate_cert", "data_gen", "calibration")


def _lint(tree: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--config",
            str(tree / "pyproject.toml"),
            "--no-cache",
        ],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_contracts_hold_on_the_code_as_it_is(tmp_path):
    result = _lint(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module,line,contract",
    [
        ("surrogate_cert/core/one_pass.py", "import calibration.artifact", "Layers"),
        ("surrogate_cert/core/stats.py", "import torch", "no torch"),
        ("data_gen/store.py", "import calibration.summary", "Layers"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, line, contract):
    tree = _copy(tmp_path)
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # injected by the test\n")
    result = _lint(tree)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and contract in result.stdout


def test_importing_the_core_imports_no_layer_above_it():
    code = (
        "import sys, surrogate_cert.core.stats, surrogate_cert.core.one_pass, surrogate_cert.core.sequential;"
        "above = [m for m in sys.modules if m.split('.')[0] in ('calibration', 'data_gen') "
        "or m.startswith(('surrogate_cert.cli', 'surrogate_cert.workflows', 'surrogate_cert.deploy'))];"
        "print(above)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
