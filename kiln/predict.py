"""``kiln predict BUNDLE IMAGE...``: run a bundle on image files and print the top-k labels or the boxes.

Results come from :func:`kiln.outputs.predictions`, the function the server answers with, so the
command line and the REST answer agree.

Folders of any size stream through a bounded pipeline (:func:`decoded_in_order`): ``--threads`` worker
threads decode and preprocess the images (PIL and numpy release the GIL), the main thread runs the
backend on batches of ``--batch`` and writes each batch's results as soon as they come, so at most
``window`` decoded images exist at once whatever the folder holds. ``--out FILE`` writes JSON lines
(``.jsonl``/``.json``) or CSV (``.csv``) a batch at a time, each batch one flushed write: an interrupted
run leaves whole lines (and at most one cut line, dropped on resume), and ``--resume`` continues it.
"""

from __future__ import annotations

import argparse
import csv
import glob as globmod
import io
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from kiln.cli import HelpFormatter, choice, non_negative_float, positive_int
from kiln.errors import KilnError
from kiln.vocab import BACKEND_CHOICES, PRECISIONS

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from kiln.processing import Letterbox

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
OUT_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="run a bundle on image files and print the top-k labels or the boxes",
        formatter_class=HelpFormatter,
        description=(
            "Run a bundle on images with the same pre- and post-processing as the server.\n\n"
            "example:\n"
            "  kiln predict runs/digits digit.png other.png --top-k 3\n"
            "  kiln predict runs/shapes street.jpg --save out/ --json\n"
            "  kiln predict runs/shapes photos/ 'more/*.jpg' --conf 0.4 --iou 0.5 --classes circle,square "
            "--save out/\n  kiln predict runs/digits big_folder/ --out preds.jsonl --batch 32 --threads 2\n"
            "  kiln predict runs/digits big_folder/ --out preds.csv --resume   # continue an interrupted run"
        ),
    )
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder (with kiln.json)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (PNG, JPEG, ...), folders (their images, sorted) or glob patterns "
                        "('data/*.jpg', 'data/**/*.png')")
    p.add_argument("--backend", type=choice("backend", BACKEND_CHOICES), default="auto",
                   help="runtime: auto tries TensorRT, then ONNX Runtime, then PyTorch")
    p.add_argument("--precision", type=choice("precision", PRECISIONS), default=None,
                   help="artifact precision (default: the backend's choice)")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="classification: labels per image (default: kiln.json)")
    p.add_argument("--save", type=Path, default=None, metavar="OUT_DIR",
                   help="write each image with its boxes (or top label) drawn to OUT_DIR/NAME.png")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="write the results to FILE as they come: JSON lines (.jsonl, .json) or CSV (.csv)")
    p.add_argument("--resume", action="store_true",
                   help="with --out: skip the images FILE already holds and append the others")
    p.add_argument("--batch", type=positive_int, default=None,
                   help="images per backend call (default: the backend's maximum batch)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="threads decoding and preprocessing images (default: the CPU count, at most 4)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="record an unreadable image as an error and go on (default: stop at it)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is shown on stderr only when stderr is a terminal)")
    d = p.add_argument_group("detection (defaults: the bundle's kiln.json)")
    d.add_argument("--conf", type=unit_float, default=None, help="score threshold in [0, 1]")
    d.add_argument("--iou", type=unit_float, default=None, help="NMS IoU threshold in [0, 1]")
    d.add_argument("--max-det", type=positive_int, default=None, help="detections kept per image")
    d.add_argument("--agnostic", action="store_true", default=None,
                   help="NMS across classes (one box per object)")
    d.add_argument("--multi-label", action="store_true", default=None,
                   help="a box once per class over the threshold (default: its best class only)")
    d.add_argument("--classes", type=_names, default=None, metavar="A,B",
                   help="keep only these classes (labels or indices, comma-separated)")
    p.set_defaults(func=run)


def unit_float(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got '{text}'")
    return value


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected class names or indices separated by commas")
    return names


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given, folders as their images (sorted, not recursive) and glob patterns expanded
    (``**`` recurses); a folder or pattern without images, or a missing file, is an error. Paths are
    kept as strings: a folder of 100,000 files lists in a few MB."""
    from kiln.data import IMG_EXTENSIONS

    out: list[str] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            with os.scandir(path) as entries:
                found = sorted(e.path for e in entries
                               if os.path.splitext(e.name)[1].lower() in IMG_EXTENSIONS and e.is_file())
            kind = "folder"
        elif any(ch in item for ch in "*?["):
            found = sorted(p for p in globmod.glob(str(path), recursive=True) if os.path.isfile(p))
            kind = "pattern"
        elif path.is_file():
            out.append(str(path))
            continue
        else:
            raise KilnError(f"cannot read {item}: no such file, folder or matching pattern")
        if not found:
            what = ("matches no files" if kind == "pattern"
                    else f"holds no images ({', '.join(IMG_EXTENSIONS)})")
            raise KilnError(f"{kind} {item} {what}")
        out.extend(found)
    return out


@dataclass
class Decoded:
    """A batch ready for the backend: the paths in order, the input ``x [N, C, H, W]`` and placements of
    the readable ones, the decoded images when ``--save`` draws on them, and the one-line ``errors`` of
    the unreadable ones (by path)."""

    paths: list[str]
    x: np.ndarray
    boxes: list[Letterbox]
    images: list[Image.Image] | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


def in_order(items: Iterable[T], work: Callable[[T], R], threads: int, window: int) -> Iterator[R]:
    """``work(item)`` for each item in ``threads`` worker threads, yielded in input order.

    At most ``window`` items are submitted and not yet yielded, so memory stays bounded whatever the
    number of items: a new item is submitted only when the consumer takes a result. An exception from
    ``work`` is raised here, in order; the items not started are dropped."""
    if threads < 1 or window < 1:
        raise ValueError(f"threads and window >= 1 expected, got {threads} and {window}")
    it = iter(items)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="kiln-decode")
    pending: deque[Future[R]] = deque()
    try:
        for item in it:
            pending.append(pool.submit(work, item))
            if len(pending) >= window:
                break
        while pending:
            yield pending.popleft().result()
            for item in it:  # one out (taken by the consumer), one in
                pending.append(pool.submit(work, item))
                break
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Lists of ``size`` items (the last one shorter), taken lazily."""
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def batch_decoder(pre: Any, keep_images: bool, skip_bad: bool) -> Callable[[list[str]], Decoded]:
    """The work of one pipeline step: :func:`kiln.processing.load_image` (the decode every stage uses)
    on each path, then :func:`kiln.processing.preprocess` on the batch. A bad file is a one-line
    :class:`KilnError`, or with ``skip_bad`` an entry of ``Decoded.errors``."""
    from kiln import processing

    def decode(paths: list[str]) -> Decoded:
        images, good, errors = [], [], {}
        for path in paths:
            try:
                images.append(processing.load_image(path, spec=pre))
                good.append(path)
                continue
            except OSError as exc:
                error = f"cannot read {path}: {exc.strerror or exc}"
            except processing.ImageDecodeError as exc:
                error = f"{path}: {exc}"
            if not skip_bad:
                raise KilnError(error)
            errors[path] = error
        x, boxes = processing.preprocess(images, pre)
        return Decoded(paths, x, boxes, images if keep_images else None, errors)

    return decode


class ResultWriter:
    """Writes results to a stream a batch at a time, each batch one write and a flush."""

    def __init__(self, fh: IO[str], task: str = "classify", top_k: int = 1) -> None:
        self.fh = fh
        self.task = task
        self.top_k = top_k

    def lines(self, results: list[dict[str, Any]]) -> str:
        return "".join(json.dumps(r) + "\n" for r in results)

    def header(self) -> str:
        return ""

    def write(self, results: list[dict[str, Any]]) -> None:
        self.fh.write(self.lines(results))
        self.fh.flush()


class CsvWriter(ResultWriter):
    """One row per image (classification: its top-k labels and scores) or per box (detection; an
    image without boxes still gets its row); ``error`` names an unreadable image."""

    def columns(self) -> list[str]:
        if self.task == "classify":
            ranks = [f"{c}_{r}" for r in range(1, self.top_k + 1) for c in ("label", "score")]
            return ["image", *ranks, "error"]
        return ["image", "label", "score", "x1", "y1", "x2", "y2", "error"]

    def header(self) -> str:
        return self._rows([self.columns()])

    def lines(self, results: list[dict[str, Any]]) -> str:
        rows: list[list[Any]] = []
        width = len(self.columns())
        for r in results:
            if "error" in r:
                rows.append([r["image"], *[""] * (width - 2), r["error"]])
            elif self.task == "classify":
                cells = [v for t in r["top_k"] for v in (t["label"], f"{t['score']:.6g}")]
                rows.append([r["image"], *cells, *[""] * (width - 2 - len(cells)), ""])
            elif not r["boxes"]:
                rows.append([r["image"], *[""] * (width - 1)])
            else:
                rows.extend([r["image"], d["label"], f"{d['score']:.6g}", *(f"{v:.2f}" for v in d["box"]), ""]
                            for d in r["boxes"])
        return self._rows(rows)

    @staticmethod
    def _rows(rows: list[list[Any]]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue()


def out_format(path: Path) -> str:
    fmt = OUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise KilnError(f"--out {path}: unknown format '{path.suffix}'; use one of {', '.join(OUT_FORMATS)}")
    return fmt


def done_images(path: Path, fmt: str) -> set[str]:
    """The images an earlier run already wrote to ``path``. A last line cut by an interruption is
    removed from the file, so the run goes on from whole lines."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(whole))
        log.info("--resume: dropped the last line of %s, cut by the interruption", path)
    text = whole.decode("utf-8", errors="replace")
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        if rows and rows[0][:1] != ["image"]:
            raise KilnError(
                f"--resume: {path} is not a kiln predict CSV (its first line is not a header with 'image')")
        return {row[0] for row in rows[1:] if row}
    done = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError):
            raise KilnError(f"--resume: {path}:{n} is not a kiln predict JSON line") from None
    return done


def progress_bar(total: int, initial: int, enabled: bool) -> Any:
    """tqdm on stderr (images, rate and ETA), only when stderr is a terminal and ``enabled``."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                disable=not (enabled and sys.stderr.isatty()))


def run(args: argparse.Namespace) -> int:
    from kiln.bundle import Bundle
    from kiln.runtime import load

    bundle = Bundle.load(args.bundle)
    m = bundle.manifest
    detect = _detect_controls(args, m)
    if args.resume and args.out is None:
        raise KilnError("--resume continues a run written with --out FILE; give the same --out")
    fmt = out_format(args.out) if args.out is not None else None
    paths = expand_inputs(args.images)
    done = done_images(args.out, fmt) if args.resume and args.out is not None and fmt else set()
    todo = [p for p in paths if p not in done] if done else paths
    if done:
        log.info("--resume: %d of %d image(s) already in %s; %d to go", len(paths) - len(todo), len(paths),
                 args.out, len(todo))
    with load(bundle, backend=args.backend, precision=args.precision) as backend:
        batch = args.batch or backend.max_batch
        if batch > backend.max_batch:
            raise KilnError(f"--batch {batch} is over the largest batch {backend.max_batch} this backend "
                            f"takes (kiln.json batch range); use --batch {backend.max_batch} or less")
        threads = args.threads or min(4, os.cpu_count() or 1)
        info = {"backend": backend.name, "precision": backend.precision, "device": backend.device}
        top_k = args.top_k or (m.classify_post().top_k if m.task == "classify" else 1)
        sink = _open_sink(args, fmt, m.task, min(top_k, len(m.classes)), info, bundle.name)
        start, count = time.perf_counter(), 0
        try:
            decode = batch_decoder(m.preprocess, args.save is not None, args.skip_bad_images)
            names = _unique_names()
            with progress_bar(len(paths), len(paths) - len(todo), not args.no_progress) as bar:
                # `threads` batches decode while the backend runs this one: at most threads + 1 batches
                # of decoded images exist at once, whatever the folder holds
                for chunk in in_order(chunks(todo, batch), decode, threads, window=threads + 1):
                    results = infer_batch(m, backend, chunk, args.top_k, detect)
                    if args.save is not None:
                        _save(args.save, names, chunk, results, m.classes)
                    sink.write(results)
                    count += len(chunk)
                    bar.update(len(chunk))
        except KeyboardInterrupt:
            if args.out is None:
                raise
            print(f"kiln predict: interrupted after {count} image(s), written to {args.out}; run the same "
                  "command with --resume to go on", file=sys.stderr)
            return 130
        finally:
            sink.close()
    elapsed = time.perf_counter() - start
    if args.save is not None:
        print(f"saved {count} image(s) with their "
              f"{'boxes' if m.task == 'detect' else 'labels'} to {args.save}",
              file=sys.stderr)
    if args.out is not None:
        print(f"predicted {count} image(s) in {elapsed:.1f} s ({count / max(elapsed, 1e-9):.1f} images/s) -> "
              f"{args.out}", file=sys.stderr)
    return 0


def infer_batch(m: Any, backend: Any, chunk: Decoded, top_k: int | None, detect: Any) -> list[dict[str, Any]]:
    """The results of one batch in order: the backend's predictions, or the error of an unreadable image."""
    from kiln.outputs import predictions
    from kiln.runtime.base import pad_batch

    preds: list[dict[str, Any]] = []
    if len(chunk.x):
        feeds, _ = pad_batch({m.input.name: chunk.x}, backend.min_batch)
        out = {k: v[: len(chunk.x)] for k, v in backend.infer(feeds).items()}
        preds = predictions(m, out, chunk.boxes, top_k, detect)
    it = iter(preds)
    results = []
    for path in chunk.paths:
        res = {"error": chunk.errors[path]} if path in chunk.errors else next(it)
        res["image"] = path
        results.append(res)
    return results


class _Sink:
    """Where results go: a ResultWriter over --out (appended on resume), stdout text, or one streamed
    JSON document on stdout (--json)."""

    def __init__(self, writer: ResultWriter | None, fh: IO[str] | None, task: str,
                 json_doc: str | None) -> None:
        self.writer, self.fh, self.task, self.json_doc = writer, fh, task, json_doc
        self.first = True

    def write(self, results: list[dict[str, Any]]) -> None:
        if self.writer is not None:
            self.writer.write(results)
        elif self.json_doc is not None:
            for r in results:
                sys.stdout.write(("" if self.first else ",\n") + "    " + json.dumps(r))
                self.first = False
        else:
            _print_text(self.task, results)
        sys.stdout.flush()

    def close(self) -> None:
        if self.json_doc is not None:
            sys.stdout.write(("" if self.first else "\n") + "  ]\n}\n")
        if self.fh is not None:
            self.fh.close()


def _open_sink(args: argparse.Namespace, fmt: str | None, task: str, top_k: int, info: dict[str, Any],
               model: str) -> _Sink:
    if args.out is not None:
        appending = args.resume and args.out.is_file() and args.out.stat().st_size > 0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fh = open(args.out, "a" if appending else "w", encoding="utf-8", newline="")  # noqa: SIM115 - closed by the sink
        writer = (CsvWriter if fmt == "csv" else ResultWriter)(fh, task, top_k)
        if not appending:
            fh.write(writer.header())
        return _Sink(writer, fh, task, None)
    if args.json:
        head = json.dumps({"model": model, "task": task, **info})[:-1]
        sys.stdout.write(head + ', "predictions": [\n')
        return _Sink(None, None, task, head)
    return _Sink(None, None, task, None)


def _save(out: Path, names: Callable[[str], str], chunk: Decoded, results: list[dict[str, Any]],
          classes: list[str]) -> None:
    from kiln.draw import save_prediction

    images = iter(chunk.images or [])
    for res in results:
        if "error" not in res:
            save_prediction(out / f"{names(res['image'])}.png", next(images), res, classes)


def _detect_controls(args: argparse.Namespace, m: Any) -> Any:
    """kiln.json's detection controls with the flags given; detection flags on a classifier are an error."""
    from kiln.processing import detect_overrides

    given = [f for f in ("conf", "iou", "max_det", "agnostic", "multi_label", "classes")
             if getattr(args, f, None) is not None]
    if m.task != "detect":
        if given:
            raise KilnError(
                f"--{given[0].replace('_', '-')} applies to detection bundles; this "
                "one classifies (use --top-k)")
        return None
    if args.top_k is not None:
        raise KilnError("--top-k applies to classification; use --max-det to limit the boxes per image")
    return detect_overrides(m.detect_post(), m.classes, conf=args.conf, iou=args.iou, max_det=args.max_det,
                            agnostic=args.agnostic, multi_label=args.multi_label, only=args.classes)


def _print_text(task: str, results: list[dict[str, Any]]) -> None:
    for res in results:
        if "error" in res:
            print(f"{res['image']}: error: {res['error']}")
        elif task == "classify":
            tops = ", ".join(f"{r['label']} {r['score']:.3f}" for r in res["top_k"])
            print(f"{res['image']}: {tops}")
        else:
            print(f"{res['image']}: {len(res['boxes'])} object(s)")
            for d in res["boxes"]:
                x1, y1, x2, y2 = d["box"]
                print(f"  {d['label']:<16} {d['score']:.3f}  [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}]")


def _unique_names() -> Callable[[str], str]:
    """A file name per image path, its stem, numbered when an earlier path had the same stem."""
    taken: set[str] = set()

    def name(path: str) -> str:
        stem = candidate = Path(path).stem or "image"
        n = 0
        while candidate in taken:
            n += 1
            candidate = f"{stem}-{n}"
        taken.add(candidate)
        return candidate

    return name
