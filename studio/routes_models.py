"""Compare, Export (``kiln export`` then ``kiln eval --bench --json``), Test (the bundle on this machine,
through the same decode, pre- and post-processing as ``kiln predict`` and the server), Serve (``kiln
serve`` in a subprocess) and downloads."""

from __future__ import annotations

import json
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from kiln.errors import KilnError
from kiln.studio.forms import command_line
from kiln.studio.paths import PathRefused, confine
from kiln.studio.runs import read_metrics, summary, tail
from kiln.studio.state import Studio, studio
from kiln.vocab import GRAPH_PRECISIONS

router = APIRouter(prefix="/api")
CALIB_METHODS = ("auto", "minmax", "entropy", "percentile")  # checked again by kiln export itself
INT8_LAYOUTS = ("tensorrt", "cpu")
# Detection answers carry every box over this score with no NMS: the page's sliders filter them.
TEST_CONF = 0.05
BUNDLE_SKIP = ("last.pt", "best.pt")


# ---- compare ---------------------------------------------------------------------------------------


@router.get("/compare")
def compare(request: Request, run: list[str] = Query(...)) -> list[dict[str, Any]]:
    """For each run: its curves (metrics.csv), parameters, best metrics, artifacts with sizes and, when
    exported from the studio, the accuracy/speed table."""
    s = studio(request)
    out = []
    for r in run:
        path = s.run_dir(r)
        info = summary(path, r)
        if info["params"] is None:  # a bundle from before kiln.json recorded it
            info["params"] = _count_params(path / "model.pt")
        out.append({**info, "metrics": read_metrics(path), "bench": _bench_table(s, r)})
    return out


def _count_params(path: Path) -> int | None:
    """Trainable-size parameters of model.pt (its float tensors, without BatchNorm running statistics)."""
    try:
        import torch
    except ModuleNotFoundError:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError):
        return None
    return sum(int(v.numel()) for k, v in state.items()
               if hasattr(v, "is_floating_point") and v.is_floating_point() and "running_" not in k)


# ---- export ----------------------------------------------------------------------------------------


@router.post("/export", status_code=202)
def export(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Queue ``kiln export RUN --precision ...`` and then ``kiln eval RUN --bench --json`` (the table)."""
    s = studio(request)
    run, path = _bundle_run(s, body)
    if s.active_job(run) is not None:
        raise HTTPException(409, f"{run} is already queued or running")
    precisions = body.get("precisions") or ["fp32"]
    if not isinstance(precisions,
                      list) or not precisions or any(p not in GRAPH_PRECISIONS for p in precisions):
        raise HTTPException(400, f"precisions: a list of {', '.join(GRAPH_PRECISIONS)}")
    argv = ["export", f"--precision={','.join(precisions)}"]
    if "int8" in precisions:
        method = str(body.get("calib_method") or "auto")
        layout = str(body.get("int8_layout") or "tensorrt")
        if method not in CALIB_METHODS:
            raise HTTPException(400, f"calib_method: one of {', '.join(CALIB_METHODS)}")
        if layout not in INT8_LAYOUTS:
            raise HTTPException(400, f"int8_layout: one of {', '.join(INT8_LAYOUTS)}")
        argv += [f"--calib-method={method}", f"--int8-layout={layout}"]
        for key, flag in (("max_accuracy_drop", "--max-accuracy-drop"), ("calib_images", "--calib-images")):
            if body.get(key) not in (None, ""):
                try:
                    value = float(body[key]) if key == "max_accuracy_drop" else int(body[key])
                except (TypeError, ValueError):
                    raise HTTPException(400, f"{key}: expected a number, got {body[key]!r}") from None
                argv.append(f"{flag}={value}")
    if body.get("triton"):
        argv.append(f"--triton-repo={run}/triton")
    argv.append(run)
    iters = int(body.get("bench_iters") or 20)
    table = ["eval", run, "--bench", "--json", f"--bench-iters={max(1, min(iters, 1000))}"]
    job = s.store.add("export", run, [argv, table],
                      {"command": f"{command_line(argv)} && {command_line(table)}"})
    return {"job": job.public(), "command": job.info["command"]}


def _bundle_run(s: Studio, body: dict[str, Any]) -> tuple[str, Path]:
    """The ``run`` a request names and its folder, which must hold a bundle."""
    run = str(body.get("run", ""))
    path = s.run_dir(run)
    if not (path / "kiln.json").is_file():
        raise HTTPException(409, f"{run} has no bundle yet (kiln.json): train it first")
    return run, path


@router.get("/run/table")
def run_table(request: Request, run: str = Query(...)) -> dict[str, Any]:
    """The accuracy x size x speed table of the run's latest export job, and that job."""
    s = studio(request)
    s.run_dir(run)
    job = s.latest_job(run, "export")
    log = ""
    if job is not None:
        log = "\n".join(tail(s.runner.log_path(job)).splitlines()[-30:])
    return {"job": job.public() if job else None, "table": _bench_table(s, run), "log": log}


def _bench_table(s: Studio, run: str) -> dict[str, Any] | None:
    for job in reversed(s.store.list(run=run, kind="export", states=("done",))):
        try:
            data = json.loads(s.runner.out_path(job, 1).read_text())
        except (OSError, ValueError):
            continue
        return {"task": _task(s, run), "metrics": data.get("metrics"),
                "artifacts": data.get("artifacts") or []}
    return None


def _task(s: Studio, run: str) -> str | None:
    try:
        return json.loads((s.run_dir(run) / "kiln.json").read_text()).get("task")
    except (OSError, ValueError):
        return None


# ---- test ------------------------------------------------------------------------------------------


@router.post("/predict")
async def predict(request: Request, run: str = Query(...), precision: str | None = Query(None),
                  files: list[UploadFile] = File(...)) -> dict[str, Any]:
    """Each image through the bundle as ``kiln predict`` runs it: per image its top-k (classify) or every
    box over 0.05 before NMS (detect; the page applies score and IoU), and the milliseconds it took."""
    import asyncio

    s = studio(request)
    path = s.run_dir(run)
    if len(files) > s.cfg.max_images:
        raise HTTPException(413, f"at most {s.cfg.max_images} images per request")
    if precision is not None and precision not in GRAPH_PRECISIONS:
        raise HTTPException(400, f"precision: one of {', '.join(GRAPH_PRECISIONS)}")
    datas = [await f.read() for f in files]
    return await asyncio.to_thread(_predict, s, path, precision, datas, [f.filename or "" for f in files])


def _predict(s: Studio, path: Path, precision: str | None, datas: list[bytes],
             names: list[str]) -> dict[str, Any]:
    from kiln import processing
    from kiln.outputs import predictions
    from kiln.runtime.base import pad_batch

    backend, bundle = bundle_backend(s, path, precision)
    m = bundle.manifest
    detect = None
    if m.task == "detect":
        detect = processing.detect_overrides(m.detect_post(), m.classes, conf=TEST_CONF, iou=1.0)
    results: list[dict[str, Any]] = []
    for data, name in zip(datas, names, strict=True):
        t0 = time.perf_counter()
        try:
            img = processing.decode_image(data, s.cfg.max_image_pixels)
        except KilnError as exc:
            results.append({"name": name, "error": str(exc)})
            continue
        x, boxes = processing.preprocess([img], m.preprocess)
        feeds, _ = pad_batch({m.input.name: x}, backend.min_batch)
        out = {k: v[:1] for k, v in backend.infer(feeds).items()}
        res = predictions(m, out, boxes, None, detect)[0]
        results.append({"name": name, **res, "ms": (time.perf_counter() - t0) * 1000})
    post = m.postprocess.model_dump() if hasattr(m.postprocess, "model_dump") else m.postprocess
    return {"task": m.task, "classes": m.classes, "backend": backend.name, "precision": backend.precision,
            "postprocess": post, "results": results}


def bundle_backend(s: Studio, path: Path, precision: str | None) -> Any:
    from kiln.bundle import Bundle
    from kiln.runtime import load

    try:
        stamp = (path / "kiln.json").stat().st_mtime
    except OSError:
        raise HTTPException(409, f"{path.name} has no bundle yet (kiln.json)") from None
    key = (str(path), precision, stamp)
    with s.backend_lock:  # one backend per bundle and precision, replaced when kiln.json changes
        if key not in s.backends:
            for old in [k for k in s.backends if k[0] == str(path)]:
                s.backends.pop(old)[0].close()
            bundle = Bundle.load(path)
            s.backends[key] = (load(bundle, backend="auto", precision=precision), bundle)
        return s.backends[key]


# ---- serve -----------------------------------------------------------------------------------------


@router.post("/serve", status_code=202)
def serve(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Start ``kiln serve RUN`` on a free loopback port."""
    s = studio(request)
    run, path = _bundle_run(s, body)
    if s.store.list(run=run, kind="serve", states=("queued", "running")):
        raise HTTPException(409, f"{run} is already being served")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["serve", run, "--host=127.0.0.1", f"--port={port}"]
    precision = body.get("precision")
    if precision:
        if precision not in GRAPH_PRECISIONS:
            raise HTTPException(400, f"precision: one of {', '.join(GRAPH_PRECISIONS)}")
        argv.append(f"--precision={precision}")
    job = s.store.add("serve", run, [argv], {"port": port, "model": path.name, "command": command_line(argv)})
    return {"job": job.public(), "command": job.info["command"]}


@router.get("/serve")
def servers(request: Request) -> list[dict[str, Any]]:
    """Running servers with their address, whether they answer /readyz, and client snippets."""
    import httpx

    s = studio(request)
    out = []
    for job in s.store.list(kind="serve", states=("queued", "running")):
        url = f"http://127.0.0.1:{job.info['port']}"
        ready = False
        if job.state == "running":
            try:
                ready = httpx.get(url + "/readyz", timeout=0.5).status_code == 200
            except httpx.HTTPError:
                ready = False
        out.append({**job.public(), "url": url, "ready": ready, "snippets": snippets(url, job.info["model"])})
    return out


@router.post("/serve/stop")
def stop_serve(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    s = studio(request)
    job = s.store.get(int(body.get("id", 0) or 0))
    if job is None or job.kind != "serve":
        raise HTTPException(404, "no such server")
    s.runner.stop(job)
    return {"job": (s.store.get(job.id) or job).public()}


def snippets(url: str, model: str) -> dict[str, str]:
    """Ways to call the server: curl (the native /v1 route, an image file), Python (httpx) and
    tritonclient (KServe v2)."""
    predict = f"{url}/v1/models/{model}/predict"
    host = url.removeprefix("http://")
    return {
        "curl": f"curl -s -F file=@image.jpg {predict}",
        "python": (
            "import httpx\n"
            "with open('image.jpg', 'rb') as f:\n"
            f"    r = httpx.post('{predict}', files={{'file': f}})\n"
            "print(r.json())"
        ),
        "tritonclient": (
            "import numpy as np\nimport tritonclient.http as http\n\n"
            f"client = http.InferenceServerClient('{host}')\n"
            f"meta = client.get_model_metadata('{model}')\n"
            "shape = [1, *meta['inputs'][0]['shape'][1:]]  # one image, preprocessed as kiln.json says\n"
            "x = http.InferInput(meta['inputs'][0]['name'], shape, 'FP32')\n"
            "x.set_data_from_numpy(np.zeros(shape, np.float32))\n"
            f"print(client.infer('{model}', [x]).get_response())"
        ),
    }


# ---- downloads -------------------------------------------------------------------------------------


@router.get("/download")
def download(request: Request, run: str = Query(...), file: str = Query(...)) -> FileResponse:
    """One file of a run (an artifact, kiln.json, metrics.csv...), confined to the run folder."""
    s = studio(request)
    path = s.run_dir(run)
    try:
        target = confine(file, (path,), base=path)
    except PathRefused as exc:
        raise HTTPException(403, str(exc)) from None
    if not target.is_file():
        raise HTTPException(404, f"{file}: no such file in {run}")
    return FileResponse(target, filename=target.name)


@router.get("/download/bundle")
def download_bundle(request: Request, run: str = Query(...)) -> FileResponse:
    """The bundle as a zip: everything in the run folder but the training checkpoints."""
    s = studio(request)
    path = s.run_dir(run)
    with tempfile.NamedTemporaryFile(suffix=".zip", dir=s.cfg.state_dir, delete=False) as tmp, \
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(path.rglob("*")):
            if (p.is_file() and not p.is_symlink() and p.name not in BUNDLE_SKIP
                    and "tensorboard" not in p.parts):
                z.write(p, Path(path.name) / p.relative_to(path))
    return FileResponse(tmp.name, filename=f"{path.name}.zip", media_type="application/zip",
                        background=BackgroundTask(Path(tmp.name).unlink, missing_ok=True))


__all__ = ["bundle_backend", "router", "snippets"]
