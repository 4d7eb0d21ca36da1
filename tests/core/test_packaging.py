"""`pip install .` (non-editable) gives working kiln.* imports from any directory."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_non_editable_install_imports_every_stage(tmp_path: Path):
    # Build from a copy of the source tree: pip builds in-tree and would leave build/ in the checkout.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src,
                    ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "demo", "*.egg-info",
                                                              "__pycache__", ".*_cache", ".kiln-cache"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import kiln, kiln.bench, kiln.bench.cli, kiln.data, kiln.models, kiln.train, kiln.train.detect, "
        "kiln.export, kiln.serve, kiln.calib, kiln.runtime;"
        "print(kiln.train.__file__); print(kiln.models.MODELS['lenet5'].task)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                         check=True, capture_output=True, text=True, timeout=120)
    first, second = out.stdout.split()
    assert first.startswith(str(target)) and second == "classify"
    assert (target / "bin" / "kiln").exists()
    assert (target / "kiln" / "serve" / "static" / "index.html").is_file()  # the page ships as package data
