"""``kiln bench``: latency and throughput of a bundle's backends, or load on a running server."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kiln.bench.loadgen import ENCODINGS, PROTOCOLS, LoadConfig, run_load
from kiln.bench.report import (
    engine_table,
    engine_title,
    load_table,
    load_title,
    plot_engine,
    render_table,
    write_json,
)
from kiln.bench.sweep import BACKENDS, PRECISIONS, BenchConfig, run_bench
from kiln.cli import HelpFormatter, choice, csv_of, non_negative_int, positive_float, positive_int
from kiln.errors import ConfigError

log = logging.getLogger("kiln.bench")

DESCRIPTION = """\
Benchmark a bundle's backends, or load-test a running kiln server.

Engine mode (BUNDLE): every runnable backend x precision x batch, p50/p90/p99/mean latency, items/s
and the speedup against PyTorch fp32 measured in the same run. Inputs: random tensors of the
bundle's input spec (standard normal, fixed seed), or real images with --images.
  kiln bench runs/digits
  kiln bench runs/digits --backend all --precision fp32,int8 --batch 1,8,32 --json bench.json --plot bench.png

Server mode (--url): closed-loop concurrency sweeps or open-loop Poisson arrivals against
POST /v1/models/NAME/predict (native) or /v2/models/NAME/infer (v2); latency percentiles, requests/s,
errors by status code, the client's own CPU time and the server's batch size distribution from /metrics.
  kiln bench --url http://127.0.0.1:8000 --model digits --concurrency 1,8,32,64 --duration 10
  kiln bench --url http://127.0.0.1:8000 --model digits --concurrency 64 --client-procs 2
  kiln bench --url http://127.0.0.1:8000 --model digits --rate 200 --duration 20"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench",
                       help="latency/throughput of a bundle's backends, or load-test a running server",
                       formatter_class=HelpFormatter, description=DESCRIPTION)
    p.add_argument("bundle", nargs="?", metavar="BUNDLE", help="bundle folder (engine mode)")
    e = p.add_argument_group("engine mode")
    e.add_argument("--backend", type=csv_of(choice("backend", BACKENDS)), default=["auto"],
                   help="auto | tensorrt | onnxrt | torch | all (comma-separated)")
    e.add_argument("--precision", type=csv_of(choice("precision", PRECISIONS)), default=["fp32"],
                   help="comma-separated: fp32,fp16,bf16,int8 (int8/fp16 need those artifacts)")
    e.add_argument("--batch", type=csv_of(positive_int), default=[1, 8, 32],
                   help="batch sizes, comma-separated")
    e.add_argument("--warmup", type=non_negative_int, default=None,
                   help="warm-up calls per combination (engine, default 10) or "
                        "requests per level (server, default 20)")
    e.add_argument("--iters", type=positive_int, default=None,
                   help="timed calls per combination (default 100)")
    e.add_argument("--duration", type=positive_float, default=None,
                   help="seconds per combination (engine, instead of --iters) or per "
                        "level (server, default 10)")
    e.add_argument("--threads", type=positive_int, default=None,
                   help="intra-op threads (ONNX Runtime, torch)")
    e.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: what each backend picks)")
    e.add_argument("--images", metavar="PATH", default=None,
                   help="real inputs: an image file or folder, read through the bundle's preprocessing")
    e.add_argument("--plot", metavar="FILE.png", default=None,
                   help="plot latency and throughput against batch size")
    s = p.add_argument_group("server mode")
    s.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    s.add_argument("--model", default=None, help="model name on the server")
    s.add_argument("--concurrency", type=csv_of(positive_int), default=None,
                   help="closed loop: requests in flight, one level after another (default 1,8,32,64)")
    s.add_argument("--rate", type=positive_float, default=None,
                   help="open loop: mean requests/s (Poisson arrivals)")
    s.add_argument("--image", metavar="FILE", default=None,
                   help="image to send (native protocol; default: a generated noise PNG)")
    s.add_argument("--protocol", type=choice("protocol", PROTOCOLS), default="native",
                   help="native: POST /v1/models/NAME/predict; "
                   "v2: POST /v2/models/NAME/infer (random tensor)")
    s.add_argument("--encoding", type=choice("encoding", ENCODINGS), default="json",
                   help="native request body: JSON base64 or multipart file")
    s.add_argument("--images-per-request", type=positive_int, default=1, help="native: images in one request")
    s.add_argument("--timeout", type=positive_float, default=30.0, help="per-request timeout in seconds")
    s.add_argument("--max-requests", type=positive_int, default=100_000, help="cap on requests per level")
    s.add_argument("--max-inflight", type=positive_int, default=512,
                   help="open loop: cap on requests in flight")
    s.add_argument("--client-procs", type=positive_int, default=1,
                   help="client processes sharing each level (connections, rate and caps split between them)")
    s.add_argument("--api-key", default=None, help="Bearer token; $KILN_API_KEY when not given")
    s.add_argument("--batch-metric", default=None,
                   help="name of the server's batch size histogram (default: the "
                        "first histogram named *batch_size*)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write the full report (environment, config, samples)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random inputs / Poisson arrivals seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.url is not None:
        if args.bundle is not None:
            raise ConfigError("give either BUNDLE (engine mode) or --url (server mode), not both")
        return run_server(args)
    if args.bundle is None:
        raise ConfigError(
            "give a BUNDLE folder to benchmark its backends, or --url URL --model NAME for a server")
    server_only = [f for f in ("model", "concurrency", "rate", "image") if getattr(args, f) is not None]
    if server_only:
        raise ConfigError(f"--{server_only[0]} is a server-mode option (it needs --url)")
    if args.iters is not None and args.duration is not None:
        raise ConfigError("give either --iters or --duration, not both")
    cfg = BenchConfig(
        backends=list(args.backend), precisions=list(args.precision), batches=list(args.batch),
        warmup=10 if args.warmup is None else args.warmup,
        iters=None if args.duration is not None else (args.iters or 100),
        duration=args.duration, threads=args.threads, device=args.device, images=args.images, seed=args.seed,
    )
    report = run_bench(args.bundle, cfg, progress=lambda m: log.info("timing %s", m))
    header, rows, notes = engine_table(report)
    print(render_table(engine_title(report), header, rows, notes), end="")
    _write(report, args)
    if args.plot:
        plot_engine(report, args.plot)
        print(f"wrote {args.plot}")
    # A backend or precision asked for that gave no row is a failure, not a table of baselines.
    for miss in report["unmet"]:
        print(f"kiln bench: error: no result for {miss['backend']} {miss['precision']}: {miss['reason']}",
              file=sys.stderr)
    if report["unmet"]:
        return 2
    return 0 if any(r["status"] == "ok" for r in report["results"]) else 1


def run_server(args: argparse.Namespace) -> int:
    if args.model is None:
        raise ConfigError("--model NAME is required with --url (the model name on the server)")
    engine_only = [
        f for f in ("iters", "threads", "device", "images", "plot") if getattr(args, f, None) is not None]
    if engine_only:
        raise ConfigError(f"--{engine_only[0]} is an engine-mode option (it needs BUNDLE, not --url)")
    cfg = LoadConfig(
        url=args.url, model=args.model, concurrency=args.concurrency, rate=args.rate,
        duration=args.duration if args.duration is not None else 10.0,
        warmup=20 if args.warmup is None else args.warmup,
        protocol=args.protocol, encoding=args.encoding, image=args.image,
        images_per_request=args.images_per_request, timeout=args.timeout, max_requests=args.max_requests,
        max_inflight=args.max_inflight, api_key=args.api_key or os.environ.get("KILN_API_KEY") or None,
        batch_metric=args.batch_metric, seed=args.seed, client_procs=args.client_procs,
    )
    report = run_load(cfg)
    header, rows, notes = load_table(report)
    print(render_table(load_title(report), header, rows, notes, left=1), end="")
    _write(report, args)
    return 0 if any(lv["ok"] for lv in report["levels"]) else 1


def _write(report: dict, args: argparse.Namespace) -> None:
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
