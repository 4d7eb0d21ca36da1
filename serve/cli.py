"""``kiln serve BUNDLE [BUNDLE ...]``: the REST server. fastapi, uvicorn and the runtimes load in run()."""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path
from typing import Any

from kiln.cli import HelpFormatter, choice, csv_of, non_negative_float, positive_float, positive_int
from kiln.errors import ConfigError
from kiln.vocab import BACKEND_CHOICES, PRECISIONS

log = logging.getLogger("kiln.serve")

# Flag name -> Settings field; flags default to "not given" so KILN_* variables apply underneath.
_FLAGS = (
    "host", "port", "grpc_port", "backend", "precision", "max_batch", "max_delay_ms", "max_queue",
    "timeout_s", "api_key",
    "max_body_bytes", "max_image_pixels", "max_images_per_request", "max_request_pixels",
    "max_pixels_per_byte", "decode_threads",
    "max_decode_queue",
    "max_header_bytes", "body_timeout_s", "keep_alive_s", "drain_s", "cors_origins", "top_k", "workers",
    "threads",
    "end_to_end",
    "header_timeout_s", "max_connections",
)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got '{text}'") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve bundles over REST (native /v1, KServe v2) with dynamic batching",
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS,
        description=(
            "Serve one or more bundles: POST /v1/models/NAME/predict (multipart `file` fields or JSON "
            "base64),\nKServe v2 /v2/models/NAME/infer, /healthz, /readyz, /metrics, /docs and a try-it page "
            "at /.\nEvery flag can also be set with a KILN_* environment variable (KILN_MAX_BATCH=16, "
            "KILN_API_KEY=...);\na flag wins over the variable. SIGTERM turns /readyz to 503, keeps serving "
            "for --drain-s seconds,\nthen stops accepting, finishes in-flight requests and exits 0.\n\n"
            "example:\n"
            "  kiln serve runs/digits --port 8000 --max-batch 32 --max-delay-ms 2\n"
            "  curl -F file=@digit.png http://127.0.0.1:8000/v1/models/digits/predict"
        ),
    )
    p.add_argument("bundles", nargs="+", metavar="BUNDLE", help="bundle folders (with kiln.json)")
    p.add_argument("--name", action="append", dest="names", metavar="NAME",
                   help="model name for the bundle at the same position (repeat once per bundle; "
                        "default: the bundle folder's name)")
    p.add_argument("--host", help="interface to listen on [KILN_HOST, default 127.0.0.1; 0.0.0.0 for all]")
    p.add_argument("--port", type=_port, help="TCP port [KILN_PORT, default 8000; 0 picks a free one]")
    p.add_argument("--grpc-port", type=_port,
                   help="also serve the KServe v2 gRPC protocol on this port [KILN_GRPC_PORT, default off; 0 "
                        "picks a free one]")
    p.add_argument("--backend", type=choice("backend", BACKEND_CHOICES),
                   help="runtime [KILN_BACKEND, default auto: TensorRT, then ONNX Runtime, then PyTorch]")
    p.add_argument("--precision", type=choice("precision", PRECISIONS),
                   help="artifact precision [KILN_PRECISION, default: the backend's choice]")
    p.add_argument("--end-to-end", action="store_true",
                   help="detectors: serve the graph with NMS inside (kiln export --nms) [KILN_END_TO_END]; "
                        "/v1 answers the same boxes")
    _add_batching(p)
    _add_limits(p)
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="intra-op threads per model for ONNX Runtime / PyTorch [KILN_THREADS, default: one "
                        "per physical core]; with --workers N on a CPU, about cores / N")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="server processes sharing the port, each with its own batchers and backends "
                        "[KILN_WORKERS, default 1; on a CPU see docs/serve.md; one per GPU]")
    p.add_argument("--access-log", action="store_true", default=False,
                   help="log every request (uvicorn access log)")
    p.set_defaults(func=run)


def _add_batching(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=positive_int, metavar="N",
                   help="items per batch [KILN_MAX_BATCH, default: the backend's maximum]")
    g.add_argument("--max-delay-ms", type=non_negative_float, metavar="MS",
                   help="how long a batch waits for more requests after its first "
                        "[KILN_MAX_DELAY_MS, default 2]")
    g.add_argument("--max-queue", type=positive_int, metavar="N",
                   help="queued requests per model before answering 503 [KILN_MAX_QUEUE, default 256]")
    g.add_argument("--timeout-s", type=positive_float, metavar="S",
                   help="per-request deadline before answering 504 [KILN_TIMEOUT_S, default 30]")
    g.add_argument("--top-k", type=positive_int, metavar="K",
                   help="classification labels per image [KILN_TOP_K, default: kiln.json]")


def _add_limits(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("limits and security")
    s.add_argument("--api-key", metavar="KEY",
                   help="require 'Authorization: Bearer KEY' except on health endpoints [KILN_API_KEY; "
                        "unset or empty: no key, the server is open]")
    s.add_argument("--max-body-bytes", type=positive_int, metavar="N",
                   help="request body limit, 413 above [KILN_MAX_BODY_BYTES, default 20 MiB]")
    s.add_argument("--max-image-pixels", type=positive_int, metavar="N",
                   help="width x height limit per image [KILN_MAX_IMAGE_PIXELS, default 40000000]")
    s.add_argument("--max-images-per-request", type=positive_int, metavar="N",
                   help="images in one request [KILN_MAX_IMAGES_PER_REQUEST, default 64]")
    s.add_argument("--max-request-pixels", type=positive_int, metavar="N",
                   help="decode budget: width x height summed over a request's images, checked from the "
                        "headers before decoding; 413 above [KILN_MAX_REQUEST_PIXELS, default 40000000]")
    s.add_argument("--max-pixels-per-byte", type=positive_float, metavar="R",
                   help="decompression-bomb guard: an image over 4 Mpx that decodes to more than R pixels "
                        "per byte of its file is refused from its header; 400 "
                        "[KILN_MAX_PIXELS_PER_BYTE, default 256]")
    s.add_argument("--decode-threads", type=positive_int, metavar="N",
                   help="requests decoding images at once, off the event loop "
                        "[KILN_DECODE_THREADS, default 2]")
    s.add_argument("--max-decode-queue", type=positive_int, metavar="N",
                   help="requests waiting for a decode thread (first come, first served) before 503 + "
                        "Retry-After [KILN_MAX_DECODE_QUEUE, default 64]")
    s.add_argument("--max-header-bytes", type=positive_int, metavar="N",
                   help="request line + headers limit, 431 above [KILN_MAX_HEADER_BYTES, default 65536]")
    s.add_argument("--header-timeout-s", type=positive_float, metavar="S",
                   help="a request line + headers not complete within S seconds of the connection opening "
                        "(or of the request's first byte on a kept-alive connection) gets 408 and the "
                        "connection closes; a connection that sends nothing is closed "
                        "[KILN_HEADER_TIMEOUT_S, default 10]")
    s.add_argument("--max-connections", type=positive_int, metavar="N",
                   help="open HTTP connections per process; above it new requests get 503 with Connection: "
                        "close (/healthz and /readyz still answer) [KILN_MAX_CONNECTIONS, default: the "
                        "open-file limit (raised to its hard value at start) less 192, at most 8192]")
    s.add_argument("--body-timeout-s", type=positive_float, metavar="S",
                   help="wait this long for more of a request body, then 408 "
                        "[KILN_BODY_TIMEOUT_S, default 30]")
    s.add_argument("--keep-alive-s", type=positive_int, metavar="S",
                   help="close idle keep-alive connections after S seconds [KILN_KEEP_ALIVE_S, default 5]")
    s.add_argument("--drain-s", type=non_negative_float, metavar="S",
                   help="after SIGTERM, keep serving (with /readyz 503) for S seconds before closing the "
                        "listener [KILN_DRAIN_S, default 5; 0: close at once]")
    s.add_argument("--cors-origins", type=csv_of(str), metavar="URL,...",
                   help="allowed CORS origins [KILN_CORS_ORIGINS, default none: CORS off]")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kiln.bundle import Bundle
    from kiln.serve.settings import Settings

    try:
        settings = Settings.from_flags(**{k: getattr(args, k, None) for k in _FLAGS})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid setting {where} (flag --{where.replace('_', '-')} or "
                          f"KILN_{where.upper()}): {first['msg']}") from None
    names = getattr(args, "names", None)
    if names is not None and len(names) != len(args.bundles):
        raise ConfigError(
            f"--name was given {len(names)} time(s) for {len(args.bundles)} bundle(s): give one per bundle")
    bundles = [Bundle.load(path) for path in args.bundles]
    models = [(names[i] if names else b.name, b) for i, b in enumerate(bundles)]
    from kiln import runtime

    for b in bundles:  # a backend that cannot run here fails now, in one line, not after the server started
        runtime.preflight(b, settings.backend, settings.precision, end_to_end=settings.end_to_end)

    from kiln.serve.workers import run_workers, serve_socket

    sock = _listen(settings.host, settings.port)
    grpc_hold = None
    try:
        if settings.grpc_port is not None:
            grpc_hold = _hold_grpc_port(settings.host, settings.grpc_port, shared=settings.workers > 1)
            settings = settings.model_copy(update={"grpc_port": grpc_hold.getsockname()[1]})
            if settings.workers == 1:
                grpc_hold.close()  # the one server binds it itself, a moment later
        host, port = sock.getsockname()[:2]
        log.info("serving %s on http://%s:%d (docs at /docs)", ", ".join(n for n, _ in models), host, port)
        # Bundle paths, not loaded bundles: each worker process loads its own.
        by_path = [(name, str(Path(path))) for (name, _), path in zip(models, args.bundles, strict=True)]
        if settings.workers > 1:
            return run_workers(by_path, settings, sock, access_log=args.access_log)
        return serve_socket(by_path, settings, sock, access_log=args.access_log)
    finally:
        sock.close()
        if grpc_hold is not None:
            grpc_hold.close()


def _bind(host: str, port: int, what: str, reuse_port: bool = False) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen{what} on {host}:{port}: {exc.strerror}") from None
    return sock


def _listen(host: str, port: int) -> socket.socket:
    """Bind here rather than in uvicorn, so a port in use is a one-line error instead of sys.exit."""
    sock = _bind(host, port, "")
    sock.set_inheritable(True)
    return sock


def _hold_grpc_port(host: str, port: int, shared: bool) -> socket.socket:
    """A socket bound to the gRPC port (port 0: a free one), so a port in use is a one-line error before
    anything loads. ``shared`` (``--workers N``): bound with ``SO_REUSEPORT`` and kept by the parent for
    its lifetime, so every worker (and any replacement) can listen on it while no other program can; the
    port is first bound without ``SO_REUSEPORT``, which fails if anyone else holds it, even sharing."""
    probe = _bind(host, port, " for gRPC (--grpc-port)")
    if not shared:
        return probe
    port = probe.getsockname()[1]
    probe.close()
    return _bind(host, port, " for gRPC (--grpc-port)", reuse_port=True)
