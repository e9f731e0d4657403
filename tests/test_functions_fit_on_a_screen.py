"""No function of the package is longer than a screen (80 lines) without a reason written beside it.

A function's length is ``end_lineno - lineno + 1`` of its ``def`` (decorators excluded, docstring
included). A longer one passes only with a comment ``# long: <reason>`` on the line just above its
``def`` (above its decorators, if any) or in its header before its first statement.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("surrogate_cert", "data_gen", "calibration")
MAX_LINES = 80
MARKER = "# long:"


def _has_reason(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    top = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    candidates = [top - 1] + list(range(node.lineno, node.body[0].lineno))  # 1-based line numbers
    for number in candidates:
        text = lines[number - 1].strip() if 1 <= number <= len(lines) else ""
        if text.startswith(MARKER) and len(text[len(MARKER) :].strip()) >= 10:
            return True
    return False


def _long_functions(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES and not _has_reason(lines, node):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return found


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_function_fits_on_a_screen_or_says_why():
    long = [entry for path in _sources() for entry in _long_functions(path)]
    assert not long, (
        f"functions over {MAX_LINES} lines without a '{MARKER} <reason>' comment above their def; split them "
        "by what each piece does, or write why they must be read at once:\n" + "\n".join(long)
    )


@pytest.mark.parametrize(
    "source, flagged",
    [
        ("def f():\n" + "    x = 1\n" * 80, True),
        ("def f():\n" + "    x = 1\n" * 79, False),
        ("# long: an argparse builder, one flat list of options\ndef f():\n" + "    x = 1\n" * 90, False),
        ("# long:\ndef f():\n" + "    x = 1\n" * 90, True),  # a marker without a reason does not count
        ("# long: a reason that is long enough\n@decorator\ndef f():\n" + "    x = 1\n" * 90, False),
        ("def f(\n    a,\n):\n    # long: the reason, in the header\n" + "    x = 1\n" * 90, False),
        ("class C:\n    def f(self):\n" + "        x = 1\n" * 85, True),  # methods count too
    ],
)
def test_the_check_itself(source, flagged):
    lines = source.splitlines()
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]
    long = [n for n in nodes if n.end_lineno - n.lineno + 1 > MAX_LINES and not _has_reason(lines, n)]
    assert bool(long) == flagged, source[:80]
