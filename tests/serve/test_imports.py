"""A serving image may have no PyTorch: kiln.serve and kiln predict must import without it."""

from __future__ import annotations

import subprocess
import sys


def test_serve_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "import kiln.serve.app, kiln.serve.batcher, kiln.serve.cli, kiln.serve.schemas, kiln.serve.settings, "
        "kiln.predict\n"
        "from kiln.serve.app import create_app\n"
        "print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
