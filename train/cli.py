"""``kiln train``, ``kiln eval`` and ``kiln data``. The training loop (torch) is imported inside ``kiln
train``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from kiln.cli import (
    HelpFormatter,
    batch_range,
    choice,
    csv_of,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
)
from kiln.data import DataSpec, check_paths
from kiln.errors import ConfigError
from kiln.train.cli_support import artifact_tables, disk_full, disk_full_error, eval_slug, print_per_class
from kiln.train.config import (
    AMP_MODES,
    DEVICES,
    MODEL_NAMES,
    OPTIMIZERS,
    SCHEDULES,
    TASKS,
    TrainConfig,
    check_model_name,
    default_batch_size,
)
from kiln.train.early import check_pretrained_offline
from kiln.vocab import BACKEND_CHOICES

# Only what the parser needs is imported above: `kiln train` reports argument mistakes before the runtime,
# evaluation and report modules (and torch) load; each command imports what it runs.

log = logging.getLogger("kiln.train")

DATASETS = ("digits", "mnist:DIR", "cifar10:DIR", "folder:DIR", "shapes", "coco:ANN.json:IMAGES",
            "yolo:DATA.yaml", "voc:ROOT")


def _data_spec(text: str) -> str:
    try:
        DataSpec.parse(text)
    except Exception as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--data: ")) from None
    return text


def _batch_range_text(text: str) -> str:
    return str(batch_range(text))  # TrainConfig keeps the range as text, as config.json shows it


def _defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(TrainConfig) if f.name != "extra"}


def register(sub: argparse._SubParsersAction) -> None:
    _register_train(sub)
    _register_eval(sub)
    _register_data(sub)


def _register_train(sub: argparse._SubParsersAction) -> None:
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
            "  kiln train --nproc 2 --data digits --out runs/ddp   # 2 processes (DDP), as torchrun would\n"
            "  torchrun --nproc-per-node 2 -m kiln.cli train --data digits --out runs/ddp\n\n"
            f"Datasets (--data): {', '.join(DATASETS)}. Nothing is downloaded."
        ),
    )
    g = p.add_argument_group("data and model")
    g.add_argument("--data", type=_data_spec, default=s, help=f"dataset spec (default: {d['data']})")
    g.add_argument("--model", default=s,
                   help="architecture (default: lenet5 for classification, kiln-det-s for detection): "
                        + ", ".join(MODEL_NAMES) + ", any torchvision classifier "
                                                   "(e.g. convnext_tiny) or timm:NAME")
    g.add_argument("--task", type=choice("task", TASKS), default=s,
                   help="classify | detect (default: from --model or --data)")
    g.add_argument("--image-size", type=positive_int, default=s,
                   help="input side in pixels (default: for folder sets the images' median shorter side, "
                        "rounded and bounded to 32..224; else the model's, or the dataset's)")
    g.add_argument("--val-fraction", type=open_fraction, default=s,
                   help="share held out for validation when the dataset has no val split (default: "
                        f"{d['val_fraction']})")
    g.add_argument("--skip-bad-images", action="store_true", default=s,
                   help="skip unreadable images instead of stopping")
    g.add_argument("--weights", default=s, metavar="FILE",
                   help="start from a local state dict, e.g. a downloaded torchvision/timm checkpoint (head "
                        "replaced if the class count differs)")
    g.add_argument("--pretrained", nargs="?", const="DEFAULT", default=s, metavar="WEIGHTS",
                   help="start from the library's pretrained weights (torchvision: DEFAULT or a name such as "
                        "IMAGENET1K_V2; kiln-det-<backbone>: the backbone's); fetched through TORCH_HOME / "
                        "the Hugging Face cache")
    g.add_argument("--workers", type=non_negative_int, default=s,
                   help="DataLoader worker processes "
                        "(default: 0 for in-memory datasets, up to 4 for image files)")
    _add_train_options(p, d, s)
    p.set_defaults(func=run_train, train_parser=p)


def _add_train_options(p: argparse.ArgumentParser, d: dict[str, Any], s: str) -> None:
    """The optimization and run options of ``kiln train``."""
    o = p.add_argument_group("optimization")
    o.add_argument("--epochs", type=positive_int, default=s, help=f"(default: {d['epochs']})")
    o.add_argument("--freeze-backbone", type=non_negative_int, default=s, metavar="N",
                   help="train only the new head for the first N epochs, then everything (default: 0)")
    o.add_argument("--backbone-lr-scale", type=positive_float, default=s, metavar="F",
                   help="the backbone's learning rate is F x --lr, e.g. 0.1 when fine-tuning (default: 1)")
    o.add_argument("--batch-size", type=positive_int, default=s,
                   help="the global batch, split evenly over the processes (default: 64 for classification, "
                        "16 for detection, halved down to 8 until an epoch has 10 steps)")
    o.add_argument("--lr", type=positive_float, default=s,
                   help="peak learning rate "
                        "(default: 2e-3 for adam/adamw, 0.05 for sgd/momentum, 0.01 for adagrad)")
    o.add_argument("--optimizer", type=choice("optimizer", OPTIMIZERS), default=s,
                   help=f"{', '.join(OPTIMIZERS)} (default: {d['optimizer']})")
    o.add_argument("--schedule", type=choice("schedule", SCHEDULES), default=s,
                   help=f"{', '.join(SCHEDULES)} (default: {d['schedule']})")
    o.add_argument("--warmup-epochs", type=non_negative_float, default=s,
                   help="linear warm-up (default: 5%% of the run, at most 1 epoch)")
    o.add_argument("--weight-decay", type=non_negative_float, default=s,
                   help=f"(default: {d['weight_decay']})")
    o.add_argument("--label-smoothing", type=non_negative_float, default=s,
                   help=f"(default: {d['label_smoothing']})")
    o.add_argument("--grad-clip", type=positive_float, default=s,
                   help="clip the gradient norm to this value (default: off)")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=s, metavar="RUN_DIR",
                   help="run folder / bundle (default: runs/<data>-<model>-<time>)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    r.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                   help="start N training processes on this machine (DDP: one per GPU, or CPU processes with "
                        "gloo) through torch.distributed.run, as torchrun --nproc-per-node N would "
                        "(default: 1)")
    r.add_argument("--seed", type=int, default=s, help=f"(default: {d['seed']})")
    r.add_argument("--deterministic", action="store_true", default=s, help="use deterministic kernels only")
    r.add_argument("--device", type=choice("device", DEVICES), default=s,
                   help="auto | cpu | cuda (default: auto)")
    r.add_argument("--amp", type=choice("amp mode", AMP_MODES), default=s,
                   help="mixed precision on CUDA: auto (bf16 where supported), bf16, fp16, off")
    r.add_argument("--channels-last", action="store_true", default=s,
                   help="channels_last memory format on CUDA")
    r.add_argument("--compile", action="store_true", default=s, help="torch.compile the model")
    r.add_argument("--no-precise-bn", dest="precise_bn", action="store_false", default=s,
                   help="keep the running BatchNorm statistics of training instead of re-estimating them on "
                        "training images before each validation")
    r.add_argument("--precise-bn-images", type=positive_int, default=s, metavar="N",
                   help="training images the BatchNorm statistics are re-estimated on (default: "
                        f"{d['precise_bn_images']})")
    r.add_argument("--batch-range", type=_batch_range_text, default=s, metavar="MIN:OPT:MAX",
                   help=f"batch range recorded for export and serving (default: {d['batch_range']})")
    r.add_argument("--json", action="store_true", help="print a machine-readable summary on stdout")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")


def _register_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval", help="accuracy / mAP of a bundle, and a table over its exported artifacts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Evaluate a bundle on its validation split (or --data): top-1/top-5, per-class accuracy and a\n"
            "confusion matrix for classifiers; COCO mAP for detectors. The fp32 result is stored in "
            "kiln.json\nas the reference later stages compare with; exported artifacts get a comparison "
            "table.\n--bench adds one table of accuracy and speed per artifact (size, top-1/mAP, p50 ms, "
            "items/s).\n\nExample:\n  kiln eval runs/digits --json\n  kiln eval runs/digits --bench"
        ),
    )
    e.add_argument("bundle", metavar="RUN_OR_BUNDLE")
    e.add_argument("--data", type=_data_spec,
                   help="evaluate on this dataset's val split instead (same classes)")
    e.add_argument("--backend", default="torch", type=choice("backend", BACKEND_CHOICES),
                   help="runtime for the main evaluation")
    e.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    e.add_argument("--no-table", action="store_true", help="skip the table over exported artifacts")
    e.add_argument("--bench", action="store_true",
                   help="also time every artifact: size, top-1/mAP, p50 ms at batch 1, items/s at the best "
                        "batch")
    e.add_argument("--bench-batch", type=csv_of(positive_int), default=[1, 8, 32], metavar="B,B,...",
                   help="batch sizes timed by --bench (default: 1,8,32)")
    e.add_argument("--bench-iters", type=positive_int, default=50, metavar="N",
                   help="timed calls per artifact and batch for --bench, after N/10 warm-up calls "
                        "(default: 50)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    d = e.add_argument_group(
        "detection",
        "post-processing for mAP (default: the COCO protocol: score >= 0.01, 100 boxes per image, "
                     "every class over the threshold per box, the bundle's NMS IoU); a result with any of "
                     "these is written under eval/ and not recorded as the bundle's reference")
    d.add_argument("--conf", type=non_negative_float, metavar="SCORE", help="score threshold")
    d.add_argument("--iou", type=non_negative_float, metavar="IOU", help="NMS IoU threshold")
    d.add_argument("--max-det", type=positive_int, metavar="N", help="boxes kept per image")
    d.add_argument("--agnostic", action="store_true", default=None, help="NMS across classes")
    d.add_argument("--single-label", dest="multi_label", action="store_false", default=None,
                   help="each box counts once, with its best class")
    d.add_argument("--classes", type=lambda t: [c.strip() for c in t.split(",") if c.strip()],
                   metavar="A,B,...",
                   help="score only these classes (labels or indices)")
    e.set_defaults(func=run_eval)


def _register_data(sub: argparse._SubParsersAction) -> None:
    dp = sub.add_parser(
        "data", help="inspect a dataset, write a built-in one, or a few sample images, to disk",
        formatter_class=HelpFormatter,
        description="Inspect a dataset (counts per class and split, image sizes, unreadable files, "
                    "imbalance, the\ninput size and steps per epoch a run would get), write a built-in "
                    "dataset to disk so its\nformat can be seen and reused, or write a few validation images "
                    "as PNG files.\n\nExamples:\n"
                    "  kiln data inspect folder:photos --batch-size 16 --save inspect/   # + contact sheet "
                    "and JSON\n  kiln data shapes --out data/shapes           # the shapes detection set in "
                    "COCO layout\n  kiln data shapes --format yolo --out data/y  # ... in Ultralytics "
                    "layout, with data.yaml\n  kiln data sample digits --out samples/       # "
                    "samples/digit-<label>-<i>.png\n  kiln data sample shapes --out samples/       # images, "
                    "and copies with their boxes drawn")
    dp.add_argument("name", type=choice("data command", ("inspect", "shapes", "sample")),
                    metavar="{inspect,shapes,sample}",
                    help="inspect: summarise DATA; shapes: write the synthetic detection set; sample: write "
                         "sample images of DATA")
    dp.add_argument("sample_data", nargs="?", type=_data_spec, metavar="DATA",
                    help=f"with inspect and sample: the dataset spec ({', '.join(DATASETS)})")
    dp.add_argument("--out", metavar="DIR", help="shapes, sample: folder to write into (created if missing)")
    dp.add_argument("--count", type=positive_int,
                    help="number of images (default: the training set size for shapes; one per class, or 4 "
                         "detection images, for sample)")
    dp.add_argument("--seed", type=int, default=0,
                    help="random seed of the generated images and of the val split")
    dp.add_argument("--format", type=choice("format", ("coco", "yolo")), default="coco",
                    help="shapes: coco (annotations/instances_{train,val}.json) or yolo "
                         "(labels/ and data.yaml)")
    i = dp.add_argument_group("inspect")
    i.add_argument("--batch-size", type=positive_int, metavar="B",
                   help="steps per epoch at this batch size "
                        "(default: the batch size kiln train would choose)")
    i.add_argument("--image-size", type=positive_int, metavar="S", help="the --image-size a run would get")
    i.add_argument("--model", metavar="NAME",
                   help="the --model a run would use, for the input size it takes "
                        "(default: the task's default model)")
    i.add_argument("--val-fraction", type=open_fraction, default=0.2,
                   help="share held out when DATA has no val split")
    i.add_argument("--save", metavar="DIR",
                   help="write contact_sheet.png (a row of samples per class) and summary.json")
    i.add_argument("--per-class", type=positive_int, default=8, metavar="N",
                   help="images per class on the contact sheet")
    i.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    dp.set_defaults(func=run_data)


def run_train(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    _check_before_torch(args, given)
    if args.nproc > 1:
        return _launch(args)
    if args.resume and "out" in given:
        raise _usage("--resume RUN_DIR and --out cannot be combined (the run folder is RUN_DIR)")
    # the training loop imports torch: `kiln --help` and the other commands do not need it
    from kiln.train.loop import TrainingInterrupted, train

    try:
        result, trainer = train(resume=args.resume, overrides=given, progress=not args.no_progress)
    except TrainingInterrupted as stop:
        if stop.main:
            print(f"interrupted: the bundle in {stop.result.run_dir} holds the best of "
                  f"{len(stop.result.history)} epoch(s); continue with: kiln train --resume "
                  f"{stop.result.run_dir}", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as exc:
        if not disk_full(exc):
            raise
        raise disk_full_error(Path(args.resume or given.get("out") or "runs")) from None
    if trainer.dist.main:
        summary = result.summary(trainer.cfg, trainer.task.name)
        best = ", ".join(f"{k} {v:.4g}" for k, v in result.best.items())
        if result.up_to_date:
            print(f"{result.run_dir} already holds all {len(result.history)} epoch(s) (best epoch "
                  f"{result.best_epoch}: {best}); nothing to train, nothing changed on disk. Pass a larger "
                  "--epochs to train further.", file=sys.stderr)
        else:
            print(f"trained {trainer.cfg.model} on {trainer.cfg.data}: best epoch {result.best_epoch} "
                  f"({best}); {result.seconds:.1f} s, {result.images_per_s:.0f} images/s -> {result.run_dir}",
                  file=sys.stderr)
            files = result.files
            print(f"  curves: {files.get('curves')}  metrics: {files.get('metrics_csv')}  "
                  f"TensorBoard: tensorboard --logdir {files.get('tensorboard')}", file=sys.stderr)
            for warning in result.warnings:
                print(f"  warning: {warning}", file=sys.stderr)
        if args.json:
            print(json.dumps(summary, indent=2))
    return 0


def _check_before_torch(args: argparse.Namespace, given: dict[str, Any]) -> None:
    """The argument mistakes that cost nothing to find: reported before torch loads (which takes seconds,
    a minute on a busy machine). A resumed run's saved settings are checked by the run itself."""
    if args.resume:
        return
    if given.get("model"):
        check_model_name(given["model"])
    check_paths(given.get("data") or TrainConfig.data)
    if given.get("weights") and not Path(given["weights"]).expanduser().is_file():
        raise _usage(f"--weights: no file {Path(given['weights']).expanduser()}")
    check_pretrained_offline(given.get("model"), given.get("pretrained"))


def _launch(args: argparse.Namespace) -> int:
    """Run this command in ``--nproc`` processes: torch.distributed.run's agent (what torchrun runs) in
    this process, the children with the same options but ``--nproc`` (see :mod:`kiln.train.launch`)."""
    if "WORLD_SIZE" in os.environ:
        raise _usage(f"--nproc {args.nproc}: this process is already one of {os.environ['WORLD_SIZE']} "
                     "started by torchrun; drop --nproc")
    from kiln.train import checkpoint
    from kiln.train.device import Dist
    from kiln.train.launch import launch

    # refused here once, not by every process
    if args.resume:
        checkpoint.load(Path(args.resume) / checkpoint.LAST)
    if hasattr(args, "batch_size"):
        Dist(world=args.nproc).split_batch(args.batch_size)
    argv = [*(["--verbose"] if args.verbose else []), "train", *_child_argv(args)]
    log.info("starting %d training processes: torchrun --standalone --nproc-per-node %d -m kiln.cli %s",
             args.nproc, args.nproc, shlex.join(argv))
    return launch(args.nproc, argv, verbose=args.verbose)


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The ``kiln train`` options the user gave, as arguments again (without ``--nproc``).

    Read from the parser's own actions, so every option of ``kiln train`` is passed on; a value is
    written back with ``str()``, which every option type accepts again.
    """
    argv: list[str] = []
    parser: argparse.ArgumentParser = args.train_parser
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "nproc") or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def _usage(msg: str) -> Exception:
    return ConfigError(msg)


def run_eval(args: argparse.Namespace) -> int:
    from kiln import runtime
    from kiln.bundle import Bundle
    from kiln.evaluate import bundle_split, eval_post, json_safe, run_split, split_metrics
    from kiln.fsutil import remove_stale_temps
    from kiln.train.reports import write_classify_reports, write_detect_reports

    bundle = Bundle.load(args.bundle)
    remove_stale_temps(bundle.root)  # what an interrupted eval or export left behind
    m = bundle.manifest
    ds = bundle_split(bundle, "val", args.data)
    with runtime.load(bundle, backend=args.backend, precision="fp32") as backend:
        res = run_split(bundle, backend, ds, args.limit)
        info = {"backend": backend.name, "precision": backend.precision, "device": backend.device}
    files: dict[str, str]
    controls = {"conf": args.conf, "iou": args.iou, "max_det": args.max_det, "agnostic": args.agnostic,
                "multi_label": args.multi_label, "only": args.classes}
    given = {k: v for k, v in controls.items() if v is not None}
    if given and m.task != "detect":
        raise ConfigError(
            f"--{next(iter(given)).replace('_', '-')} applies to detection; this bundle classifies")
    post = eval_post(bundle, **given) if m.task == "detect" else None
    reference = args.data is None and args.limit is None and not given
    # Only the reference evaluation writes beside kiln.json; others go to a subfolder so the
    # reports in the bundle always match the numbers recorded in it.
    out_dir = bundle.root if reference else bundle.root / "eval" / eval_slug(
        args.data or m.training.get("data", "val"), args.limit, given)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = split_metrics(bundle, res, ds, post)
    if m.task == "detect":
        files = write_detect_reports(bundle, res, ds, metrics, out_dir, post)
        headline = f"mAP@[.5:.95] {100 * metrics['map']:.2f}  mAP@.5 {100 * metrics['map50']:.2f}"
    else:
        files = write_classify_reports(bundle, metrics, out_dir)
        headline = f"top-1 {metrics['top1']:.2f}%" + (
            f"  top-5 {metrics['top5']:.2f}%" if len(m.classes) > 5 else "")
    record = {**json_safe(metrics), **info, "split": "val", "data": args.data or m.training.get("data"),
              "images": len(res.targets)}
    record.pop("confusion", None)
    if reference:
        m.evaluation["fp32"] = record
        bundle.save()
    print(
        f"{bundle.name}: {headline} on {len(res.targets)} val images ({info['backend']}, "
        f"{info['precision']})", file=sys.stderr)
    print_per_class(m.task, m.classes, metrics)
    print("wrote " + ", ".join(sorted(files.values())), file=sys.stderr)
    table = artifact_tables(bundle, args)
    if args.json:
        print(
            json.dumps({"bundle": str(bundle.root), "metrics": record, "files": files, "artifacts": table},
                       indent=2, default=str))
    return 0


def run_data(args: argparse.Namespace) -> int:
    from kiln.data.detect import write_shapes_coco, write_shapes_yolo
    from kiln.train.samples import write_samples

    if args.name == "inspect":
        return _run_inspect(args)
    if args.out is None:
        raise _usage(f"kiln data {args.name} needs --out DIR")
    if args.name == "sample":
        if args.sample_data is None:
            raise _usage("kiln data sample needs a dataset, e.g. kiln data sample digits --out samples/")
        for path in write_samples(args.sample_data, args.out, args.count, seed=args.seed):
            print(path)
        return 0
    if args.sample_data is not None:
        raise _usage(
            f"kiln data shapes takes no dataset (got {args.sample_data}); did you mean kiln data sample "
            f"{args.sample_data}?")
    if args.format == "yolo":
        path = write_shapes_yolo(args.out, count=args.count, seed=args.seed)
        print(f"wrote {path.parent}; train with --data yolo:{path}", file=sys.stderr)
        return 0
    path = write_shapes_coco(args.out, count=args.count, seed=args.seed)
    print(f"wrote {path}; train with --data "
          f"coco:{path / 'annotations' / 'instances_train.json'}:{path / 'images' / 'train'}",
          file=sys.stderr)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from kiln.data import open_dataset
    from kiln.data.dataset import collect_skipped
    from kiln.data.inspect import save_inspection, summarize

    if args.sample_data is None:
        raise _usage("kiln data inspect needs a dataset, e.g. kiln data inspect folder:photos")
    if args.model:
        check_model_name(args.model)
    with collect_skipped() as skipped:
        train, val = open_dataset(args.sample_data, val_fraction=args.val_fraction, seed=args.seed,
                                  skip_bad_images=True)
    # the input size exactly as `kiln train` would choose it (this loads torch, for the model registry)
    from kiln.train.resolve import input_size
    from kiln.train.tasks import make_task

    model = args.model or make_task(train.task, len(train.classes)).default_model
    size = input_size(TrainConfig(data=args.sample_data, model=model, image_size=args.image_size), train)
    batch = args.batch_size or default_batch_size(train.task, len(train))
    summary = summarize(args.sample_data, train, val, size, batch, skipped)
    for line in summary.format():
        print(line, file=sys.stderr)
    if args.save:
        files = save_inspection(summary, train, val, args.save, per_class=args.per_class)
        print("wrote " + ", ".join(str(p) for p in files.values()), file=sys.stderr)
    if args.json:
        print(summary.to_json(indent=2))
    return 0
