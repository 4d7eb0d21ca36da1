"""``kiln studio``: the browser application over the workspace's runs and the allowed data folders."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kiln.cli import HelpFormatter
from kiln.serve.cli import _port  # the same port rule as kiln serve

log = logging.getLogger("kiln.studio")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "studio",
        help="the browser application: datasets, runs with live curves, compare, export, test, serve",
        formatter_class=HelpFormatter,
        description=(
            "A local web application over the workspace: add datasets, start and watch training runs, "
            "compare\nthem, export, test images and start servers, through the same kiln commands.\n\n"
            "Examples:\n"
            "  kiln studio                                   # workspace: this folder, "
            "http://127.0.0.1:8080\n  kiln studio --workspace ~/kiln --data-root ~/photos\n"
            "  KILN_STUDIO_TOKEN=... kiln studio --host 0.0.0.0   # other machines: every API call needs the "
            "token"
        ),
    )
    p.add_argument("--workspace", default=".", metavar="DIR",
                   help="folder for runs (runs/<name>) and the studio's state (.studio/)")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR", dest="data_roots",
                   help="a folder datasets may be read from (repeat for more; the workspace always is one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on; anything but loopback needs a token")
    p.add_argument("--port", type=_port, default=8080, help="TCP port (0 picks a free one)")
    p.add_argument("--token", nargs="?", const=True, default=None, metavar="TOKEN",
                   help="require this token on every API call (--token alone makes a random one; "
                        "default: KILN_STUDIO_TOKEN if set)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from kiln.studio.app import build_app
    from kiln.studio.config import StudioConfig

    cfg = StudioConfig.build(Path(args.workspace), args.data_roots, args.host, args.port, args.token)
    app = build_app(cfg)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((cfg.host, cfg.port))
    port = sock.getsockname()[1]
    shown = "localhost" if cfg.host in ("127.0.0.1", "::1", "localhost") else cfg.host
    url = f"http://{shown}:{port}/"
    if cfg.token:
        url += f"#token={cfg.token}"
    print(f"kiln studio: {url}  (workspace {cfg.workspace})", file=sys.stderr, flush=True)
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=2))
    server.run(sockets=[sock])
    return 0
