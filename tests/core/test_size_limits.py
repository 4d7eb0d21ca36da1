"""Every module stays small enough to read: no function over 80 lines, no file over 500 lines."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kiln", "train", "export", "serve", "calib", "studio", "docker", "tools")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py"))


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of each function or method of ``source`` longer than ``limit`` lines,
    counted from its first decorator to its last line (nested functions count in their parent too)."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    lines = (child.end_lineno or child.lineno) - first + 1
                    if lines > limit:
                        found.append((name, lines))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_the_limits_are_checked_on_the_packages() -> None:
    assert len(_sources()) > 50 and any(p.parts[-2:] == ("train", "loop.py") for p in _sources())


def test_the_function_check_measures_what_it_names() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    short, long_ = (
        f"def f():\n{body}\n",
        f"class C:\n    @staticmethod\n    def g():\n    {body}\n        y = 1\n",
    )
    assert long_functions(short) == [("f", 81)]
    assert long_functions(short, limit=81) == []
    assert long_functions(long_.replace("\n    x", "\n        x")) == [("C.g", 83)]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_function_over_80_lines(path: Path) -> None:
    assert long_functions(path.read_text(encoding="utf-8")) == [], f"split these functions of {path.name}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_over_500_lines(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_FILE_LINES})"
