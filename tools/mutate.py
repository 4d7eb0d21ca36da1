"""Mutation testing of kiln's key modules with mutmut, one module at a time (`make mutate`).

mutmut names a mutant after its file path (``serve/batcher.py`` -> ``serve.batcher``) and records which
tests reach a function by the module name it runs under (``kiln.serve.batcher``). The stage folders are
installed under other names by ``[tool.setuptools] package-dir``, so the two never meet and every mutant
there reads "no tests". This script lays out a copy of the sources as the installed package
(``mutants/<module>/kiln/serve/...``, ``kiln/export``, ``kiln/calib``, ``kiln/train``), writes a
``[tool.mutmut]`` for that one module and its tests (``[tool.kiln.mutate.<module>]`` in pyproject.toml),
runs ``mutmut run`` there and prints the figures. mutmut puts its own ``mutants/`` first on
``sys.path``, so ``import kiln`` finds the mutated copy before the editable install of the checkout.

Score: killed (timeouts included) / (mutants - equivalent). Equivalent mutants are the lines
``- `<mutant name>`: reason`` in docs/testing.md.

    .venv/bin/python tools/mutate.py                  # every module, 2 workers
    .venv/bin/python tools/mutate.py batcher bundle   # some of them
    MUTATE_JOBS=1 .venv/bin/python tools/mutate.py processing
    cd mutants/batcher && ../../.venv/bin/mutmut show kiln.serve.batcher.x_..._1   # one survivor
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")
DOCS = ROOT / "docs" / "testing.md"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
KILLED = {1, 3, 36, 24, -24, 152, 255}  # killed, pytest internal error, timeouts
TIMEOUT = {36, 24, -24, 152, 255}


def package_layout(pyproject: dict) -> dict[str, str]:
    """{folder in the checkout: folder in the installed layout}, from package-dir."""
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    return {src: pkg.replace(".", "/") for pkg, src in mapping.items()}


def installed_path(file: str, layout: dict[str, str]) -> str:
    """``serve/batcher.py`` -> ``kiln/serve/batcher.py`` (the longest mapped folder wins)."""
    folder = max((src for src in layout if file.startswith(src + "/")), key=len)
    return layout[folder] + file[len(folder):]


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def stage(name: str, spec: dict, pyproject: dict, text: str, layout: dict[str, str]) -> tuple[Path, str]:
    """Build mutants/<name>: the package as installed, the tests, a pyproject.toml for this module."""
    where = ROOT / "mutants" / name
    shutil.rmtree(where, ignore_errors=True)
    # parents first, so kiln/ is copied before kiln/serve/ lands inside it
    for src, dst in sorted(layout.items(), key=lambda kv: kv[1].count("/")):
        shutil.copytree(ROOT / src, where / dst, ignore=IGNORE, dirs_exist_ok=True)
    shutil.copytree(ROOT / "tests", where / "tests", ignore=IGNORE)
    target = installed_path(spec["file"], layout)
    shared = dict(pyproject["tool"]["mutmut"])
    shared.update(only_mutate=[target], pytest_add_cli_args_test_selection=spec["tests"])
    # per-module pytest options (a per-test timeout for the thread-based batcher tests, a -k filter)
    shared["pytest_add_cli_args"] = [*shared.get("pytest_add_cli_args", []), *spec.get("pytest_args", [])]
    section = "[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in shared.items())
    # replace the checkout's [tool.mutmut] (up to the next table) with this module's
    body = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[)", "", text)
    (where / "pyproject.toml").write_text(body + "\n" + section)
    return where, target


def missing_tests(modules: dict[str, dict]) -> list[str]:
    """The ``tests`` entries of ``[tool.kiln.mutate]`` that name no file in the checkout (a renamed or
    merged test file): mutmut would run a module against fewer tests, or none, without saying so."""
    return [f"{name}: {test}" for name, spec in modules.items() for test in spec["tests"]
            if not (ROOT / test.split("::")[0]).is_file()]


def equivalents() -> dict[str, str]:
    found = re.findall(r"^- `(kiln\.[^`]+__mutmut_\d+)`: (.+)$", DOCS.read_text(), flags=re.M)
    return dict(found)


def run_module(name: str, spec: dict, pyproject: dict, text: str, jobs: int) -> dict:
    layout = package_layout(pyproject)
    where, target = stage(name, spec, pyproject, text, layout)
    module = module_name(target)
    globs = [f"{module}.{g}" for g in spec.get("functions", [])]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.monotonic()
    proc = subprocess.run([str(MUTMUT), "run", "--max-children", str(jobs), *globs], cwd=where, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.monotonic() - start
    meta = where / "mutants" / (target + ".meta")
    if proc.returncode != 0 or not meta.is_file():
        print(proc.stdout[-4000:])
        raise SystemExit(f"{name}: mutmut run failed (exit {proc.returncode})")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    if globs:
        codes = {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, g) for g in globs)}
    equivalent = equivalents()
    survivors = sorted(k for k, v in codes.items() if v not in KILLED)
    counts = Counter("killed" if v in KILLED else "no tests" if v in (5, 33) else
                     "survived" if v == 0 else "other" for v in codes.values())
    eq = [k for k in survivors if k in equivalent]
    open_ = [k for k in survivors if k not in equivalent]
    total = len(codes)
    killed = counts["killed"]
    score = killed / (total - len(eq)) if total > len(eq) else 1.0
    return dict(module=name, file=spec["file"], mutants=total, killed=killed,
                timeouts=sum(v in TIMEOUT for v in codes.values()), no_tests=counts["no tests"],
                equivalent=len(eq), open=open_, score=score, seconds=seconds, jobs=jobs,
                stale_equivalents=[k for k in equivalent if k.startswith(module + ".") and k in codes
                                   and codes[k] in KILLED])


def main() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    pyproject = tomllib.loads(text)
    modules = pyproject["tool"]["kiln"]["mutate"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"some of: {', '.join(modules)} (default: all)")
    parser.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("MUTATE_JOBS", "2")))
    args = parser.parse_args()
    unknown = sorted(set(args.modules) - set(modules))
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(modules)}")
    if missing := missing_tests({m: modules[m] for m in args.modules or modules}):
        parser.error("[tool.kiln.mutate] names test files that do not exist: " + "; ".join(missing))
    rows = []
    for name in args.modules or list(modules):
        row = run_module(name, modules[name], pyproject, text, args.jobs)
        rows.append(row)
        print(f"{row['file']}: {row['mutants']} mutants, {row['killed']} killed "
              f"({row['timeouts']} by timeout), {row['equivalent']} equivalent, {len(row['open'])} survived "
              f"({row['no_tests']} with no tests), score {row['score']:.1%}, {row['seconds']:.0f} s with "
              f"{row['jobs']} worker(s)", flush=True)
        for key in row["open"]:
            print(f"    survived: {key}")
        for key in row["stale_equivalents"]:
            print(f"    listed as equivalent but killed now (remove it from docs/testing.md): {key}")
    print(f"\n{date.today().isoformat()}, {sum(r['seconds'] for r in rows):.0f} s in all")


if __name__ == "__main__":
    main()
