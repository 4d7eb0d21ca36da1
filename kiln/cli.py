"""The ``kiln`` command. Each stage registers its own sub-commands; heavy imports happen inside them.

User mistakes end with one line on stderr (``kiln <cmd>: error: ...``) and exit status 2, never a
traceback. ``KILN_DEBUG=1`` shows the traceback of a :class:`~kiln.errors.KilnError` too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from kiln import __version__
from kiln.bundle import BatchRange
from kiln.errors import KilnError, install_hint, unknown_choice

# Sub-command modules, imported to build the parser; each defines register(subparsers).
STAGES = ("kiln.train.cli", "kiln.export.cli", "kiln.serve.cli", "kiln.predict", "kiln.bench.cli",
          "kiln.studio.cli")
# The module that registers each command: running one imports that stage only (every stage's imports
# cost seconds on a busy machine before a one-line argument error could be printed). A test keeps it
# equal to what the modules register.
COMMANDS = {
    "train": "kiln.train.cli", "eval": "kiln.train.cli", "data": "kiln.train.cli",
    "export": "kiln.export.cli", "calibrate": "kiln.export.cli", "serve": "kiln.serve.cli",
    "predict": "kiln.predict", "bench": "kiln.bench.cli", "studio": "kiln.studio.cli",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Adds ``(default: X)`` once, in words: not when the help already says its default, not for
    "unset" defaults (None, False, empty), and lists as ``a, b, c`` rather than a Python repr."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or (isinstance(default, (list, tuple, str)) and not default)
            or action.option_strings == []
            or action.nargs == 0 and default is True
        ):
            return text
        shown = ", ".join(str(v) for v in default) if isinstance(default, (list, tuple)) else str(default)
        shown = shown.replace("%", "%%")  # argparse %-formats help strings
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


# ---- argparse types that name the problem --------------------------------------------------------


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def open_fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def batch_range(text: str) -> BatchRange:
    """An argparse type for ``MIN:OPT:MAX`` (or N for N:N:N), naming what is wrong with it."""
    try:
        return BatchRange.parse(text)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        msg = str(exc).splitlines()
        detail = next((m for m in msg if "MIN <= OPT <= MAX" in m), msg[0])
        raise argparse.ArgumentTypeError(detail.strip().removeprefix("Value error, ")) from None


def choice(kind: str, names: Sequence[str] | Callable[[], Sequence[str]]) -> Callable[[str], str]:
    """An argparse type accepting one of ``names``; an unknown one lists them and suggests the nearest."""

    def parse(text: str) -> str:
        valid = names() if callable(names) else names
        if text not in valid:
            raise argparse.ArgumentTypeError(str(unknown_choice(kind, text, valid)))
        return text

    parse.__name__ = kind
    return parse


def csv_of(item: Callable[[str], object]) -> Callable[[str], list[object]]:
    """An argparse type for a comma-separated list of ``item``."""

    def parse(text: str) -> list[object]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return [item(p) for p in parts]

    parse.__name__ = getattr(item, "__name__", "list")
    return parse


# ---- entry point ---------------------------------------------------------------------------------


def build_parser(argv: Sequence[str] | None = None) -> ArgumentParser:
    """The ``kiln`` parser. With ``argv`` naming a command, only that command's stage is registered;
    without (or for ``kiln --help`` and unknown commands) every stage is."""
    parser = ArgumentParser(
        prog="kiln",
        description=(
            "Train an image model, export it to ONNX / TensorRT (fp32, fp16, int8) and serve it.\n\n"
            "Typical flow:\n"
            "  kiln train --out runs/digits          # train lenet5 on the bundled digits\n"
            "  kiln eval runs/digits                 # accuracy, confusion matrix\n"
            "  kiln export runs/digits --precision fp32,fp16,int8\n"
            "  kiln predict runs/digits IMAGE.png    # labels for images, files, folders or globs\n"
            "  kiln serve runs/digits                # REST endpoint on http://127.0.0.1:8000\n"
            "  kiln bench runs/digits                # latency per backend, precision, batch size"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    command = next((a for a in argv or () if not a.startswith("-")), None)
    for module in (COMMANDS[command],) if command in COMMANDS else STAGES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("kiln"):
                continue  # stage not present in this build
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP reads this once, when torch loads (building the parser may load it): spinning threads make a
    # run several times slower whenever another process uses the cores. An explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not args.verbose:
        # kiln's own lines only: libraries narrate every pass at INFO, some on the root logger.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_kiln_or_warning)
    prog = f"kiln {args.command}"
    try:
        return int(args.func(args) or 0)
    except KilnError as exc:
        if os.environ.get("KILN_DEBUG"):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if os.environ.get("KILN_DEBUG"):
            raise
        print(f"{prog}: error: {exc.name} is not installed ({_extra_hint(exc.name)})", file=sys.stderr)
        return 2
    except OSError as exc:  # a path the user gave cannot be read or written
        if os.environ.get("KILN_DEBUG"):
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _kiln_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name == "kiln" or record.name.startswith("kiln.")


def _extra_hint(module: str | None) -> str:
    root = (module or "").split(".")[0]
    extras = {
        "torch": "train",
        "torchvision": "train",
        "onnx": "export",
        "onnxruntime": "serve",
        "fastapi": "serve",
        "uvicorn": "serve",
        "tensorrt": "trt",
        "cuda": "trt",
    }
    extra = extras.get(root)
    return f"the '{extra}' extra has it: {install_hint(extra)}" if extra else f"pip install {root}"


if __name__ == "__main__":
    sys.exit(main())
