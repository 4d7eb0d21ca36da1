"""The wheel carries a distribution name of its own (``kiln`` on the package index is another project)."""

import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DIST = "kiln-vision"


def _build_wheel(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src,
                    ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "demo", "samples",
                                                              "*.egg-info", "__pycache__", ".*_cache",
                                                              ".kiln-cache"))
    out = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
         str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def test_wheel_name_extras_and_command(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    assert wheel.name.startswith("kiln_vision-")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(meta_name).decode())
        (entry_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(entry_name).decode()
    assert meta["Name"] == DIST
    assert set(meta.get_all("Provides-Extra")) >= {"train", "export", "serve", "trt", "dev"}
    requires = meta.get_all("Requires-Dist")
    # An extra that pulls another extra must name this distribution, not the unrelated "kiln".
    self_refs = [r for r in requires if r.split("[")[0].strip().lower().startswith("kiln")]
    assert self_refs and all(r.startswith(f"{DIST}[") for r in self_refs), self_refs
    assert "kiln = kiln.cli:main" in entry_points
    # The import package stays `kiln`, stages included.
    for pkg in ("kiln/__init__.py", "kiln/train/__init__.py", "kiln/export/__init__.py",
                "kiln/serve/__init__.py", "kiln/calib/__init__.py", "kiln/runtime/__init__.py"):
        assert pkg in names, pkg


def test_every_package_folder_is_listed() -> None:
    """A package missing from [tool.setuptools] packages works editable and vanishes from the wheel."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = set()
    for name, folder in setuptools["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if any(part.startswith((".", "__")) for part in rel.parts):
                continue
            found.add(".".join([name, *rel.parts]))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"
