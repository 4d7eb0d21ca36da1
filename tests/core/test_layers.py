"""The import contracts of ARCHITECTURE.md ("Layers (enforced)"), checked with import-linter.

grimp builds its graph by walking the root package's folder, but the stages install from their own
top-level folders (``[tool.setuptools] package-dir``). The check therefore runs on a tree of symlinks
laid out as the installed package is: ``kiln/`` plus ``kiln/<stage>`` -> ``<stage>/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"


def installed_layout(dest: Path) -> Path:
    """``dest/kiln`` with every entry of ``kiln/`` and each stage folder linked in as installed."""
    package_dir = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    pkg = dest / "kiln"
    pkg.mkdir(parents=True)
    for entry in (ROOT / package_dir["kiln"]).iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in package_dir.items():
        parts = name.split(".")
        if len(parts) == 2 and not (pkg / parts[1]).exists():
            (pkg / parts[1]).symlink_to(ROOT / folder)
    return dest


def test_every_module_of_kiln_has_a_layer() -> None:
    """A new top-level module must be placed in a layer, or the contracts would not look at it."""
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    by_id = {c["id"]: c for c in contracts}
    placed = {m for c in contracts for m in c.get("layers", []) for m in m.replace(":", "|").split("|")}
    placed = {m.strip() for m in placed} | set(by_id["core"]["source_modules"])
    package_dir = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    names = {p.stem for p in (ROOT / "kiln").iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    names |= {n.split(".")[1] for n in package_dir if n.count(".") == 1}
    unplaced = sorted(f"kiln.{n}" for n in names - {"__init__"} if f"kiln.{n}" not in placed)
    assert not unplaced, f"add {unplaced} to a contract in pyproject.toml [tool.importlinter]"


def test_import_contracts_hold(tmp_path: Path) -> None:
    tree = installed_layout(tmp_path / "tree")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), str(PYPROJECT), "--no-cache"], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " 0 broken" in out.stdout
