"""``kiln train``, ``kiln eval`` and ``kiln data``. The training loop (torch) is imported inside ``kiln train``."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import fields
from typing import Any

from kiln import runtime
from kiln.bundle import BatchRange, Bundle
from kiln.cli import (
    HelpFormatter,
    choice,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
)
from kiln.compare import artifact_table, format_table
from kiln.data import DataSpec
from kiln.data.detect import write_shapes_coco
from kiln.errors import ConfigError
from kiln.evaluate import bundle_split, json_safe, run_split, split_metrics
from kiln.train.config import AMP_MODES, DEVICES, MODEL_NAMES, OPTIMIZERS, SCHEDULES, TASKS, TrainConfig
from kiln.train.reports import write_classify_reports, write_detect_reports

log = logging.getLogger("kiln.train")

DATASETS = ("digits", "mnist:DIR", "cifar10:DIR", "folder:DIR", "shapes", "coco:ANN.json:IMAGES", "yolo:DATA.yaml")


def _data_spec(text: str) -> str:
    try:
        DataSpec.parse(text)
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--data: ")) from None
    return text


def batch_range(text: str) -> str:
    try:
        return str(BatchRange.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(TrainConfig) if f.name != "extra"}


def register(sub: argparse._SubParsersAction) -> None:
    d = _defaults()
    s = argparse.SUPPRESS  # only flags the user gave override a resumed run's saved config
    p = sub.add_parser(
        "train",
        help="train a classifier or detector; the run folder becomes a bundle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train a model and write a bundle (model.pt + kiln.json) that export, serve and bench take.\n\n"
            "Examples:\n"
            "  kiln train                                  # lenet5 on the bundled digits, under runs/\n"
            "  kiln train --data cifar10:~/data/cifar --model resnet18 --epochs 30 --out runs/c10\n"
            "  kiln train --data shapes --out runs/det     # kiln-det-s on synthetic shapes\n"
            "  kiln train --resume runs/c10 --epochs 40    # continue (exactly) where it stopped\n"
            "  torchrun --nproc-per-node 2 -m kiln.cli train --data digits --out runs/ddp\n\n"
            f"Datasets (--data): {', '.join(DATASETS)}. Nothing is downloaded."
        ),
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--data", type=_data_spec, default=s, help=f"dataset spec (default: {d['data']})")
    g.add_argument("--model", type=choice("model", MODEL_NAMES), default=s,
                   help="architecture (default: lenet5 for classification, kiln-det-s for detection); "
                        "one of " + ", ".join(MODEL_NAMES))
    g.add_argument("--task", type=choice("task", TASKS), default=s, help="classify | detect (default: from --model or --data)")
    g.add_argument("--image-size", type=positive_int, default=s, help="input side in pixels (default: the model's or dataset's)")
    g.add_argument("--val-fraction", type=open_fraction, default=s,
                   help=f"share held out for validation when the dataset has no val split (default: {d['val_fraction']})")
    g.add_argument("--skip-bad-images", action="store_true", default=s, help="skip unreadable images instead of stopping")
    g.add_argument("--weights", default=s, metavar="FILE", help="start from a local state dict (head replaced if the class count differs)")
    g.add_argument("--workers", type=non_negative_int, default=s,
                   help="DataLoader worker processes (default: 0 for in-memory datasets, up to 4 for image files)")
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=positive_int, default=s, help=f"(default: {d['epochs']})")
    o.add_argument("--batch-size", type=positive_int, default=s, help="per process (default: 64 for classification, 16 for detection)")
    o.add_argument("--lr", type=positive_float, default=s, help="peak learning rate (default: 2e-3 for adam/adamw, 0.05 for sgd/momentum, 0.01 for adagrad)")
    o.add_argument("--optimizer", type=choice("optimizer", OPTIMIZERS), default=s, help=f"{', '.join(OPTIMIZERS)} (default: {d['optimizer']})")
    o.add_argument("--schedule", type=choice("schedule", SCHEDULES), default=s, help=f"{', '.join(SCHEDULES)} (default: {d['schedule']})")
    o.add_argument("--warmup-epochs", type=non_negative_float, default=s, help=f"linear warm-up (default: {d['warmup_epochs']})")
    o.add_argument("--weight-decay", type=non_negative_float, default=s, help=f"(default: {d['weight_decay']})")
    o.add_argument("--label-smoothing", type=non_negative_float, default=s, help=f"(default: {d['label_smoothing']})")
    o.add_argument("--grad-clip", type=positive_float, default=s, help="clip the gradient norm to this value (default: off)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=s, metavar="RUN_DIR", help="run folder / bundle (default: runs/<data>-<model>-<time>)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    r.add_argument("--seed", type=int, default=s, help=f"(default: {d['seed']})")
    r.add_argument("--deterministic", action="store_true", default=s, help="use deterministic kernels only")
    r.add_argument("--device", type=choice("device", DEVICES), default=s, help="auto | cpu | cuda (default: auto)")
    r.add_argument("--amp", type=choice("amp mode", AMP_MODES), default=s, help="mixed precision on CUDA: auto (bf16 where supported), bf16, fp16, off")
    r.add_argument("--channels-last", action="store_true", default=s, help="channels_last memory format on CUDA")
    r.add_argument("--compile", action="store_true", default=s, help="torch.compile the model")
    r.add_argument("--batch-range", type=batch_range, default=s, metavar="MIN:OPT:MAX", help=f"batch range recorded for export and serving (default: {d['batch_range']})")
    r.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "eval", help="accuracy / mAP of a bundle, and a table over its exported artifacts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Evaluate a bundle on its validation split (or --data): top-1/top-5, per-class accuracy and a\n"
            "confusion matrix for classifiers; COCO mAP for detectors. The fp32 result is stored in kiln.json\n"
            "as the reference later stages compare with; exported artifacts get a comparison table.\n\n"
            "Example:\n  kiln eval runs/digits --json"
        ),
    )
    e.add_argument("bundle", metavar="RUN_OR_BUNDLE")
    e.add_argument("--data", type=_data_spec, help="evaluate on this dataset's val split instead (same classes)")
    e.add_argument("--backend", default="torch", type=choice("backend", ("torch", "onnxrt", "tensorrt", "auto")),
                   help="runtime for the main evaluation")
    e.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    e.add_argument("--no-table", action="store_true", help="skip the table over exported artifacts")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    e.set_defaults(func=run_eval)

    dp = sub.add_parser("data", help="write a built-in dataset to disk", formatter_class=HelpFormatter,
                        description="Write a built-in dataset to disk so its format can be seen and reused.\n\n"
                                    "Example:\n  kiln data shapes --out data/shapes   # COCO layout")
    dp.add_argument("name", type=choice("dataset", ("shapes",)))
    dp.add_argument("--out", required=True, metavar="DIR")
    dp.add_argument("--count", type=positive_int, help="number of images (default: the training set size)")
    dp.add_argument("--seed", type=int, default=0)
    dp.set_defaults(func=run_data)


def run_train(args: argparse.Namespace) -> int:
    # the training loop imports torch: `kiln --help` and the other commands do not need it
    from kiln.train.loop import TrainingInterrupted, train

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume and "out" in given:
        raise _usage("--resume RUN_DIR and --out cannot be combined (the run folder is RUN_DIR)")
    try:
        result, trainer = train(resume=args.resume, overrides=given, progress=not args.no_progress)
    except TrainingInterrupted as stop:
        print(f"interrupted: the bundle in {stop.result.run_dir} holds the best of {len(stop.result.history)} epoch(s); "
              f"continue with: kiln train --resume {stop.result.run_dir}", file=sys.stderr)
        return 130
    if trainer.dist.main:
        summary = result.summary(trainer.cfg, trainer.task.name)
        best = ", ".join(f"{k} {v:.4g}" for k, v in result.best.items())
        print(f"trained {trainer.cfg.model} on {trainer.cfg.data}: best epoch {result.best_epoch} ({best}); "
              f"{result.seconds:.1f} s, {result.images_per_s:.0f} images/s -> {result.run_dir}", file=sys.stderr)
        if args.json:
            print(json.dumps(summary, indent=2))
    return 0


def _usage(msg: str) -> Exception:
    return ConfigError(msg)


def run_eval(args: argparse.Namespace) -> int:
    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    ds = bundle_split(bundle, "val", args.data)
    with runtime.load(bundle, backend=args.backend, precision="fp32") as backend:
        res = run_split(bundle, backend, ds, args.limit)
        info = {"backend": backend.name, "precision": backend.precision, "device": backend.device}
    files: dict[str, str]
    reference = args.data is None and args.limit is None
    # Only the reference evaluation writes beside kiln.json; others go to a subfolder so the
    # reports in the bundle always match the numbers recorded in it.
    out_dir = bundle.root if reference else bundle.root / "eval" / _slug(args.data or m.training.get("data", "val"), args.limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = split_metrics(bundle, res, ds)
    if m.task == "detect":
        files = write_detect_reports(bundle, res, ds, metrics, out_dir)
        headline = f"mAP@[.5:.95] {metrics['map']:.4f}  mAP@.5 {metrics['map50']:.4f}"
    else:
        files = write_classify_reports(bundle, metrics, out_dir)
        headline = f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%"
    record = {**json_safe(metrics), **info, "split": "val", "data": args.data or m.training.get("data"),
              "images": len(res.targets)}
    record.pop("confusion", None)
    if reference:
        m.evaluation["fp32"] = record
        bundle.save()
    print(f"{bundle.name}: {headline} on {len(res.targets)} val images ({info['backend']}, {info['precision']})", file=sys.stderr)
    if m.task == "classify":
        worst = sorted(zip(m.classes, metrics["per_class"], strict=True), key=lambda t: t[1])[:3]
        print("  lowest per-class accuracy: " + ", ".join(f"{c} {a:.1f}%" for c, a in worst), file=sys.stderr)
    table = None
    if not args.no_table and any(a.format != "torch" for a in m.artifacts.values()):
        table = artifact_table(bundle, limit=args.limit)
        print(format_table(table, m.task), file=sys.stderr)
    if args.json:
        print(json.dumps({"bundle": str(bundle.root), "metrics": record, "files": files, "artifacts": table}, indent=2, default=str))
    return 0


def _slug(data: str, limit: int | None) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", data).strip("_") or "data"
    return f"{name}-first{limit}" if limit else name


def run_data(args: argparse.Namespace) -> int:
    path = write_shapes_coco(args.out, count=args.count, seed=args.seed)
    print(f"wrote {path}", file=sys.stderr)
    return 0
