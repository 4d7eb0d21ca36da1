"""Build the TensorRT engines a bundle lacks for this GPU, at container start; print the bundles to serve.

    python3 prepare_engines.py /models/digits [/models/other ...]   -> one bundle path per line on stdout

A plan runs only on the GPU model (compute capability) and TensorRT version that built it, so images
ship ONNX and engines are built where they run. This is the engine step of ``kiln export --engine``
(kiln.export.onnx2engine on the bundle's existing ONNX artifacts): it needs neither PyTorch nor the
training data, which a serving image has not. For each precision in ``KILN_ENGINE_PRECISIONS``
(default ``fp16``; a precision without an ONNX artifact is skipped) an engine is built unless kiln.json
already lists one that ``kiln.runtime.engine_compatible`` accepts here.

A bundle on a read-only mount is copied to ``$KILN_ENGINE_DIR/NAME`` first, and later starts reuse that
copy: put ``KILN_ENGINE_DIR`` on a volume so replicas and restarts do not rebuild. Engine files and the
timing caches there are named after the GPU model and TensorRT version
(``model.fp16.nvidia-l4.trt-10.13.0.35.engine``, ``timing.nvidia-l4.trt-10.13.0.35.cache``), so replicas
on two GPU types sharing the volume keep one engine each instead of overwriting each other's. Without a GPU or
TensorRT the bundle is served as is (ONNX Runtime), with a warning, unless ``KILN_REQUIRE_ENGINE=1``.
Logs go to stderr; stdout holds only the paths.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from kiln.bundle import Bundle
from kiln.errors import ExportError, KilnError
from kiln.fsutil import atomic_path
from kiln.runtime.tensorrt import unlist_superseded_engines

log = logging.getLogger("kiln.prepare_engines")


def _compatible_engine(bundle: Bundle, precision: str) -> str | None:
    from kiln.runtime import engine_compatible

    for art in bundle.artifacts("tensorrt", precision):
        ok, why = engine_compatible(art.engine)
        if not ok:
            log.info("%s: engine %s cannot run here: %s", bundle.name, art.file, why)
        elif not bundle.path(art.file).is_file():
            log.info("%s: engine %s is listed in kiln.json but the file is missing", bundle.name, art.file)
        else:
            return art.file
    return None


def _sources(bundle: Bundle) -> dict[str, str]:
    """sha256 of every non-engine artifact: a copy is reused only while these match the mounted bundle."""
    return {a.file: a.sha256 for a in bundle.manifest.artifacts.values() if a.format != "tensorrt"}


def _writable_copy(root: Path, work: Path) -> Path:
    if os.access(root, os.W_OK) and os.access(root / "kiln.json", os.W_OK):
        return root
    dest = work / root.name
    if not (dest / "kiln.json").is_file():
        log.info("copying read-only %s to %s to add engines", root, dest)
        tmp = work / f".{root.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(root, tmp, ignore=shutil.ignore_patterns("last.pt", "best.pt", "tensorboard"))
        tmp.rename(dest)
    return dest


@contextlib.contextmanager
def bundle_lock(work: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``work/.NAME.lock``: replicas sharing the volume prepare one bundle at a
    time, so none rewrites kiln.json from a copy read before another replica's engine was recorded
    (and a replica that waited finds an engine for its GPU instead of building it again)."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / f".{name}.lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def prepare(path: Path, precisions: list[str], work: Path, require: bool) -> Path:
    """Return the bundle folder to serve: ``path``, or its copy under ``work`` holding the engines."""
    with bundle_lock(work, path.name):
        return _prepare(path, precisions, work, require)


def _prepare(path: Path, precisions: list[str], work: Path, require: bool) -> Path:
    bundle = Bundle.load(path)
    copy = work / path.name
    if copy.resolve() != path.resolve() and (copy / "kiln.json").is_file():
        if _sources(Bundle.load(copy)) == _sources(bundle):
            bundle = Bundle.load(copy)
        else:
            log.info("%s: the bundle changed since %s was made; rebuilding it", bundle.name, copy)
            shutil.rmtree(copy)
    for precision in precisions:
        onnx = bundle.artifact("onnx", precision)
        if onnx is None:
            log.info("%s: no %s ONNX artifact, no %s engine", bundle.name, precision, precision)
            continue
        if onnx.calibration is not None and onnx.calibration.layout == "cpu":
            why = (f"{onnx.file} is the int8 layout for ONNX Runtime on a CPU (--int8-layout cpu); TensorRT "
                   "builds from `kiln export --precision int8` with the default --int8-layout tensorrt")
            if require:
                raise ExportError(why)
            log.warning("%s: no %s engine: %s", bundle.name, precision, why)
            continue
        if (found := _compatible_engine(bundle, precision)) is not None:
            log.info("%s: %s engine %s matches this GPU", bundle.name, precision, found)
            continue
        target = _writable_copy(bundle.root, work)
        if target != bundle.root:
            bundle = Bundle.load(target)
        try:
            # Imported only to build: a bundle whose engines match needs no builder.
            from kiln.export.onnx2engine import engine_file_here, onnx2engine

            file = engine_file_here(precision)
            log.info("%s: building %s from %s (minutes for large models)", bundle.name, file, onnx.file)
            with atomic_path(bundle.path(file)) as tmp:
                # A folder: one timing cache per GPU model and TensorRT version.
                provenance = onnx2engine(bundle.path(onnx.file), tmp, precision=precision,
                                         batch=bundle.manifest.input.batch,
                                         input_name=bundle.manifest.input.name, timing_cache=work)
        except KilnError as exc:  # BackendUnavailable (no GPU / TensorRT) or ExportError
            if require:
                raise
            log.warning("%s: no %s engine (%s); serving with the next backend instead", bundle.name,
                        precision, exc)
            continue
        extra = {k: v for k, v in provenance.items() if k not in ("file", "format", "precision", "sha256")}
        bundle.add_artifact(file, "tensorrt", precision, source_sha256=onnx.sha256, **extra)
        if replaced := unlist_superseded_engines(bundle, file):
            log.info("%s: %s replaces %s", bundle.name, file, ", ".join(replaced))
        bundle.save()
    return bundle.root


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="prepare-engines: %(message)s", stream=sys.stderr)
    if not argv:
        print("usage: prepare_engines.py BUNDLE [BUNDLE ...]", file=sys.stderr)
        return 2
    precisions = [p.strip() for p in os.environ.get("KILN_ENGINE_PRECISIONS", "fp16").split(",") if p.strip()]
    work = Path(os.environ.get("KILN_ENGINE_DIR", "/var/lib/kiln"))
    require = os.environ.get("KILN_REQUIRE_ENGINE", "0") == "1"
    work.mkdir(parents=True, exist_ok=True)
    for arg in argv:
        path = Path(arg)
        if not (path / "kiln.json").is_file():
            log.info("%s has no kiln.json: not a bundle, skipped", path)
            continue
        print(prepare(path, precisions, work, require))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
