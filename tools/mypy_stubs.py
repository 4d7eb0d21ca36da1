"""Make the tensorrt-stubs package usable by mypy (a lint-time tool, not used at run time).

tensorrt-stubs 10.13 installs ``tensorrt/__init__.pyi`` and ``tensorrt_bindings/*.pyi`` without a
``py.typed`` marker, so mypy ignores them (PEP 561), and its generated stubs do not parse: parameters
named ``in``, a required parameter after defaulted ones, ``-> ...`` return types, a module-level
``bool`` variable that shadows the builtin in every ``-> bool``. This copies them to OUT_DIR with
those fixed, marked ``# mypy: ignore-errors`` (their remaining internal errors are not kiln's), for
``MYPYPATH=OUT_DIR mypy ...``.

    python tools/mypy_stubs.py .kiln-cache/mypy-stubs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")


def find_stubs() -> Path:
    for entry in sys.path:
        root = Path(entry or ".")
        if (root / "tensorrt" / "__init__.pyi").is_file() and (root / "tensorrt_bindings").is_dir():
            return root
    raise SystemExit("tensorrt-stubs is not installed (pip install tensorrt-stubs)")


def fix(text: str) -> str:
    text = re.sub(r"(\(|, )in: ", r"\1in_: ", text)
    text = re.sub(r"(power: Weights = None, channel_axis: int)\)", r"\1 = ...)", text)
    text = re.sub(r"-> \.\.\.:", "-> typing.Any:", text)
    text = re.sub(r"\bcapsule\b", "typing.Any", text)
    text = re.sub(r"^bool: .*$", "", text, flags=re.MULTILINE)
    if "import typing\n" not in text:
        text = "import typing\n" + text
    return "# mypy: ignore-errors\n" + text


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    src = find_stubs()
    for pkg in PACKAGES:
        for pyi in sorted((src / pkg).glob("*.pyi")):
            dest = out / pkg / pyi.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(fix(pyi.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
