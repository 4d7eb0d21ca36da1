"""Every command the README shows runs as written (long ones with fewer epochs / shorter timings).

The commands are read from README.md itself, so the README cannot drift from what kiln does: a command
this test does not know how to run fails the test instead of being skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README = ROOT / "README.md"
README_PORT = "8000"


def _code_lines() -> list[str]:
    """Lines of the README's indented code blocks, without their trailing comments."""
    out = []
    for line in README.read_text().splitlines():
        if line.startswith("    ") and line.strip():
            out.append(line.strip())
    return out


def shell_commands() -> list[str]:
    cmds = []
    for line in _code_lines():
        if line.startswith((".venv/bin/", "curl ", "pip ")):
            cmds.append(re.sub(r"\s+#\s.*$", "", line))
    return cmds


def python_snippets() -> list[str]:
    """Indented blocks that start with an import: Python a user pastes into an interpreter."""
    snippets: list[str] = []
    block: list[str] | None = None
    for line in README.read_text().splitlines() + [""]:
        code = line[4:] if line.startswith("    ") else None
        if block is None and code is not None and code.startswith("import "):
            block = [code]
        elif block is not None and code is not None and code.strip():
            block.append(code)
        elif block is not None:
            snippets.append("\n".join(block))
            block = None
    return snippets


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _shorter(cmd: list[str]) -> list[str]:
    """The same command with less work: one training epoch, fewer benchmark iterations."""
    sub = cmd[1] if len(cmd) > 1 else ""
    if sub == "train":
        if "--epochs" in cmd:
            cmd[cmd.index("--epochs") + 1] = "1"
        else:
            cmd += ["--epochs", "1"]
    if sub == "bench" and "--url" in cmd:
        cmd[cmd.index("--duration") + 1] = "1"
    elif sub == "bench":
        cmd += ["--iters", "5", "--warmup", "1"]
    if sub == "eval" and "--bench" in cmd:
        cmd += ["--bench-iters", "5"]
    return cmd


def _run(argv: list[str], cwd: Path, env: dict[str, str],
         timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kiln serve exited with {proc.returncode}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("kiln serve did not become ready")


def test_readme_lists_the_commands_this_test_runs() -> None:
    cmds = shell_commands()
    assert any(c.startswith(".venv/bin/kiln train") for c in cmds)
    assert any(c.startswith(".venv/bin/kiln serve") for c in cmds)
    assert any(c.startswith("curl ") for c in cmds)
    assert python_snippets(), "the README's tritonclient example is missing"


@pytest.mark.timeout(900)
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    port = str(_port())
    env = {**os.environ, "HOME": str(tmp_path / "home"),
           "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    (tmp_path / "home").mkdir()
    work = tmp_path / "work"
    (work / ".venv").mkdir(parents=True)
    # commands are written as .venv/bin/kiln from the repository root
    (work / ".venv" / "bin").symlink_to(BIN)
    server: subprocess.Popen[str] | None = None
    try:
        for line in shell_commands():
            line = line.replace(f":{README_PORT}", f":{port}")
            argv = shlex.split(line)
            if argv[0] == "pip":
                # Installing is checked by tests/core/test_wheel.py; here: the line names this checkout.
                assert argv[1] == "install" and argv[2].startswith(".["), line
                continue
            if argv[0] == "curl":
                argv = ["curl", "-fsS", *argv[1:]]
                out = _run(argv, work, env, timeout=60)
                assert out.returncode == 0, (line, out.stderr)
                assert '"predictions"' in out.stdout or '"label"' in out.stdout, out.stdout
                continue
            argv[0] = str(work / argv[0])
            argv = [argv[0], *_shorter(["kiln", *argv[1:]])[1:]]
            if argv[1] == "serve":
                server = subprocess.Popen([*argv, "--port", port], cwd=work, env=env, text=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                _wait_ready(int(port), server)
                for snippet in python_snippets():
                    snip = _run([sys.executable, "-c", snippet.replace(f":{README_PORT}", f":{port}")], work,
                                env, 120)
                    assert snip.returncode == 0, (snippet, snip.stderr)
                continue
            if any(a.startswith("cifar10:") for a in argv):
                # Needs a download the README explains: offline it must end in one line naming the folder.
                out = _run(argv, work, env, timeout=120)
                assert out.returncode == 2, (line, out.stderr)
                err = out.stderr.strip().splitlines()
                assert len(err) == 1 and "data/cifar" in err[0], out.stderr
                continue
            out = _run(argv, work, env)
            assert out.returncode == 0, (line, out.stdout[-2000:], out.stderr[-4000:])
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
