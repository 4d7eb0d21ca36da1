"""`make mutate`'s per-module test lists ([tool.kiln.mutate] in pyproject.toml) name test files that exist:
a renamed or merged test file would otherwise leave a module measured against fewer tests, silently."""

from __future__ import annotations

import runpy
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MUTATE = runpy.run_path(str(ROOT / "tools" / "mutate.py"))


def test_every_test_file_the_mutation_config_names_exists() -> None:
    modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["kiln"]["mutate"]
    assert modules
    assert MUTATE["missing_tests"](modules) == []
    for spec in modules.values():
        assert (ROOT / spec["file"]).is_file(), spec["file"]


def test_a_test_file_that_is_gone_is_named() -> None:
    modules = {"batcher": {"file": "serve/batcher.py",
                           "tests": ["tests/serve/test_batcher_order.py",
                                     "tests/serve/test_gone.py::test_x"]}}
    assert MUTATE["missing_tests"](modules) == ["batcher: tests/serve/test_gone.py::test_x"]
