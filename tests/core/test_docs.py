"""Every `kiln ...` command line in the code blocks of docs/*.md parses with kiln's own parser.

The lines are read from the docs themselves and handed to ``kiln.cli.build_parser().parse_args``, so a
flag renamed or removed in the code, a sub-command that no longer exists or a value its type refuses
fails here, naming the doc, the line and argparse's message. Nothing is run (no training): a few seconds.

Commands quoted in prose (`` `kiln serve --workers N` ``) are mostly fragments, so for those only each
``--flag`` is checked against the sub-command's options.

Placeholders that stand for a path or a number (``BUNDLE``, ``RUN_DIR``, ``N``) are replaced by a real
value; a line that elides its arguments with ``...`` cannot parse as written and is left out (the test
checks there are only a few). Output shown in a code block is listed in ``NOT_COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from kiln.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))

# Whole-token placeholders and what stands in for them.
PLACEHOLDERS = {
    "BUNDLE": "runs/digits",
    "RUN_DIR": "runs/digits",
    "RUN_OR_BUNDLE": "runs/digits",
    "N": "2",
}
# Lines in code blocks that start like a command but are output (the title line of a table).
NOT_COMMANDS = ("kiln bench /tmp/bench/digits on AMD EPYC",)
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    text: str
    argv: tuple[str, ...] | None  # None: elided with "...", not parseable as written

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of fenced blocks and of 4-space indented blocks after a blank line, with
    backslash continuations joined."""
    out: list[tuple[int, str]] = []
    in_fence = False
    in_indented = False
    prev_blank = True
    pending: tuple[int, str] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_fence = not in_fence
            prev_blank = False
            continue
        if in_fence:
            code = raw
        elif (
            raw.startswith("    ")
            and (in_indented or prev_blank)
            and not stripped.startswith(("- ", "* ", "|"))
        ):
            in_indented = True
            code = raw[4:]
        else:
            in_indented = in_indented and not stripped
            prev_blank = not stripped
            continue
        prev_blank = not stripped
        if pending is not None:
            pending = (pending[0], pending[1] + " " + code.strip())
        else:
            pending = (number, code.strip())
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
            continue
        out.append(pending)
        pending = None
    return out


def _kiln_argv(tokens: list[str]) -> list[str] | None:
    """The kiln arguments of one shell command, or None when it does not run kiln."""
    while tokens and _ENV.match(tokens[0]):
        tokens = tokens[1:]  # OMP_NUM_THREADS=1 kiln ...
    if not tokens:
        return None
    if tokens[0] in ("kiln", ".venv/bin/kiln"):
        return tokens[1:]
    if tokens[0] in ("torchrun", "python", "python3", ".venv/bin/python") and "kiln.cli" in tokens:
        i = tokens.index("kiln.cli")
        if i > 0 and tokens[i - 1] == "-m":
            return tokens[i + 1:]  # torchrun ... -m kiln.cli train ...
    return None


def doc_commands() -> list[DocCommand]:
    found: list[DocCommand] = []
    for doc in DOCS:
        for number, line in _code_lines(doc.read_text(encoding="utf-8")):
            if line.startswith(NOT_COMMANDS):
                continue
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue  # not shell (an unbalanced quote in JSON or Python)
            # `a && b`, `a &`: each part on its own
            parts: list[list[str]] = [[]]
            for tok in tokens:
                if tok in ("&&", "&", ";", "||"):
                    parts.append([])
                else:
                    parts[-1].append(tok)
            for part in parts:
                argv = _kiln_argv(part)
                if argv is None:
                    continue
                if "..." in argv:
                    found.append(DocCommand(doc.name, number, line, None))
                    continue
                argv = [PLACEHOLDERS.get(a, a) for a in argv]
                found.append(DocCommand(doc.name, number, line, tuple(argv)))
    return found


COMMANDS = doc_commands()
PARSEABLE = [c for c in COMMANDS if c.argv is not None]


def test_the_docs_show_kiln_commands_for_every_stage() -> None:
    subcommands = {c.argv[0] for c in PARSEABLE if c.argv}
    assert {"train", "eval", "data", "export", "calibrate", "serve", "predict", "bench"} <= subcommands
    assert len(PARSEABLE) >= 60, f"only {len(PARSEABLE)} commands found: is the code block reader broken?"
    elided = [str(c) for c in COMMANDS if c.argv is None]
    assert len(elided) <= 8, "more lines elide their arguments with '...' than expected:\n" + "\n".join(
        elided
    )


def test_output_lines_listed_as_such_are_still_in_the_docs() -> None:
    text = "\n".join(d.read_text(encoding="utf-8") for d in DOCS)
    for line in NOT_COMMANDS:
        assert line in text, f"{line!r} is no longer in docs/: drop it from NOT_COMMANDS"


@pytest.fixture(scope="module")
def parser() -> argparse.ArgumentParser:
    return build_parser()


@pytest.mark.parametrize("cmd", PARSEABLE, ids=lambda c: f"{c.doc}:{c.line}")
def test_doc_command_parses(cmd: DocCommand, parser: argparse.ArgumentParser) -> None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(list(cmd.argv or ()))
    except SystemExit as exc:
        if exc.code in (0, None):
            return  # --help / --version
        pytest.fail(f"{cmd}\n  does not parse: {err.getvalue().strip()}")
    assert callable(getattr(args, "func", None)), f"{cmd}: no sub-command ran"


def inline_spans() -> list[tuple[str, str, list[str]]]:
    """(doc, span, tokens) of inline code spans in prose that quote a kiln sub-command."""
    spans = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in re.finditer(r"`((?:\.venv/bin/)?kiln [^`]+)`", text):
            span = " ".join(m.group(1).split())
            with contextlib.suppress(ValueError):
                tokens = shlex.split(span)
                if len(tokens) > 1:
                    spans.append((doc.name, span, tokens[1:]))
    return spans


def test_flags_quoted_in_prose_exist(parser: argparse.ArgumentParser) -> None:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    unknown = []
    for doc, span, argv in inline_spans():
        command = sub.choices.get(argv[0])
        if command is None:
            continue  # "kiln train: error: ..." quotes output, not a command
        options = set(command._option_string_actions)
        for tok in argv[1:]:
            flag = tok.split("=", 1)[0]
            if flag.startswith("--") and flag != "--":
                checked += 1
                if flag not in options:
                    unknown.append(f"{doc}: `{span}`: kiln {argv[0]} has no {flag}")
    assert checked >= 20, f"only {checked} flags found in prose: is the span reader broken?"
    assert not unknown, "\n".join(unknown)


def test_the_unknown_model_error_quoted_in_train_md_is_what_kiln_says() -> None:
    """The quoted line is kiln's own, and its nearest names are distinct (kiln's models that are also
    torchvision classifiers, such as resnet18, were listed twice)."""
    from kiln.errors import ConfigError
    from kiln.models import model_entry

    text = " ".join((ROOT / "docs" / "train.md").read_text(encoding="utf-8").split())
    quoted = re.search(r"`kiln train: error: (--model: unknown model 'resnet19'\. .*?) Known: ", text)
    assert quoted is not None, "train.md no longer quotes the unknown-model error"
    with pytest.raises(ConfigError) as exc:
        model_entry("resnet19")
    message = str(exc.value)
    assert message.startswith(quoted.group(1)), message
    nearest = re.search(r"Nearest: ([^.]*)\.", message)
    assert nearest is not None
    names = nearest.group(1).split(", ")
    assert len(names) == len(set(names)), message
