"""``python tests/serve/fake_serve.py DIR``: a real uvicorn server, configured as ``kiln serve`` configures
it (kiln.serve.http_server), over a synthetic bundle and the numpy FakeBackend; settings from KILN_*.

Prints ``serving on http://HOST:PORT`` to stderr once the socket is bound (port 0: a free one, chosen
by the kernel, so tests allocate ports without races); SIGTERM exits 0 as ``kiln serve`` does.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

from conftest import FakeBackend, make_bundle  # this folder is on sys.path when run as a script

from kiln.serve.app import create_app
from kiln.serve.cli import _listen
from kiln.serve.http_server import build_server
from kiln.serve.settings import Settings


def main(root: Path) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(port=0)
    app = create_app([("digits", make_bundle(root / "digits"))], settings,
                     loader=lambda bundle, _s: FakeBackend(bundle))
    sock = _listen(settings.host, settings.port)
    server = build_server(app, app.state.registry, settings)
    host, port = sock.getsockname()[:2]
    print(f"serving on http://{host}:{port}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises the signal it stopped on
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
