"""The package's code shape: no function over 80 lines, no class over 250, mccabe at most 12.

Sizes count a def/class node's lines minus its own docstring's. Complexity is ruff's C901 at
``max-complexity = 12``. ``PENDING`` lists known offenders (none now: keep it so); an entry that
no longer offends fails the test until it is removed, and so does any offender not on it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "runflow_frames"
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 250
MAX_COMPLEXITY = 12

# Offender -> the rules it breaks: "size" (a function over 80 lines or a class over 250) and
# "C901" (complexity over 12). Nested defs are dotted (Class.method). Fix one, then delete it here.
PENDING: dict[str, set[str]] = {}

Offenders = dict[str, set[str]]


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _label(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _definitions(
    node: ast.AST, prefix: str = ""
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef]]:
    """Every def and class under ``node``, nested ones too, with dotted qualified names."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            yield name, child
            yield from _definitions(child, f"{name}.")
        else:
            yield from _definitions(child, prefix)


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> int:
    assert node.end_lineno is not None
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        assert first.end_lineno is not None
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _too_long() -> Offenders:
    found: Offenders = {}
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, node in _definitions(tree):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if _length(node) > limit:
                found.setdefault(f"{_label(path)}::{name}", set()).add("size")
    return found


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "ruff"]


def _qualname_at(path: Path, line: int) -> str:
    """The qualified name of the def that starts at ``line`` (where ruff reports C901)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for name, node in _definitions(tree):
        if node.lineno == line:
            return name
    raise AssertionError(f"no def at {_label(path)}:{line}")


def _too_complex() -> Offenders:
    command = [
        *_ruff(),
        "check",
        "--select",
        "C901",
        "--config",
        f"lint.mccabe.max-complexity = {MAX_COMPLEXITY}",
        "--output-format",
        "json",
        "--no-cache",
        str(PACKAGE),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode in (0, 1), done.stderr
    diagnostics = json.loads(done.stdout)
    assert (done.returncode == 0) == (not diagnostics), done.stderr
    found: Offenders = {}
    for d in diagnostics:
        assert d["code"] == "C901", d
        path = Path(d["filename"])
        name = _qualname_at(path, d["location"]["row"])
        found.setdefault(f"{_label(path)}::{name}", set()).add("C901")
    return found


def _unexpected(found: Offenders) -> Offenders:
    return {
        name: kinds - PENDING.get(name, set())
        for name, kinds in found.items()
        if kinds - PENDING.get(name, set())
    }


def _fixed(found: Offenders, kind: str) -> list[str]:
    return sorted(
        n for n, kinds in PENDING.items() if kind in kinds and kind not in found.get(n, ())
    )


def _listing(offenders: Offenders | list[str]) -> str:
    return "".join(f"\n  {name}" for name in sorted(offenders))


def test_pending_is_outside_the_emulator() -> None:
    assert not [n for n in PENDING if n.startswith("runflow_frames/emulator/")]
    assert all(kinds and kinds <= {"size", "C901"} for kinds in PENDING.values())


def test_functions_and_classes_are_short() -> None:
    found = _too_long()
    unexpected = _unexpected(found)
    assert not unexpected, (
        f"functions over {MAX_FUNCTION_LINES} lines or classes over {MAX_CLASS_LINES} "
        f"(docstrings not counted), split them:{_listing(unexpected)}"
    )
    fixed = _fixed(found, "size")
    assert not fixed, f"no longer too long, remove their 'size' from PENDING:{_listing(fixed)}"


def test_complexity_is_bounded() -> None:
    found = _too_complex()
    unexpected = _unexpected(found)
    assert not unexpected, (
        f"mccabe complexity over {MAX_COMPLEXITY}, simplify them:{_listing(unexpected)}"
    )
    fixed = _fixed(found, "C901")
    assert not fixed, f"no longer too complex, remove their 'C901' from PENDING:{_listing(fixed)}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('def f():\n    """Doc\n    string."""\n    return 1\n', 2),
        ("class C:\n    x = 1\n\n    def f(self):\n        pass\n", 5),
    ],
)
def test_lengths_leave_out_the_docstring(source: str, expected: int) -> None:
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.FunctionDef | ast.ClassDef)
    assert _length(node) == expected
