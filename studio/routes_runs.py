"""Runs: the New run form, the queue, live curves (server-sent events), stop, resume, delete."""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from kiln.errors import KilnError
from kiln.studio import forms
from kiln.studio.paths import PathRefused
from kiln.studio.runs import eta_seconds, progress, raw_tail, read_metrics, step_points, summary, tail
from kiln.studio.state import Studio, studio

router = APIRouter(prefix="/api")
EVENT_POLL_S = 0.25
HEARTBEAT_S = 10.0


@router.get("/train/defaults")
def train_defaults() -> dict[str, Any]:
    return forms.form_defaults()


@router.get("/train/models")
def train_models() -> dict[str, Any]:
    """Model names for the form: kiln's, then torchvision's classifiers (timm models are ``timm:NAME``)."""
    return {"kiln": list(forms.MODEL_NAMES), "torchvision": _torchvision_models()}


@functools.cache
def _torchvision_models() -> list[str]:
    try:
        import torchvision
    except ModuleNotFoundError:
        return []
    return sorted(torchvision.models.list_models(module=torchvision.models))


@router.get("/train/cost")
def train_cost(request: Request, model: str = Query(..., min_length=1, max_length=200),
               image_size: int | None = Query(None, ge=8, le=1024),
               classes: int = Query(10, ge=1, le=100_000),
               channels: int = Query(3, ge=1, le=4)) -> dict[str, Any]:
    """Parameters and GFLOPs of ``model`` for one ``image_size`` image (default: the model's own side), with
    ``classes`` outputs: the ``model_cost`` ``kiln train`` logs, computed once per combination."""
    try:
        from kiln.models import model_entry
    except ModuleNotFoundError as exc:
        raise HTTPException(501, f"{exc.name} is not installed: the model table needs the 'train' extra "
                                 "(pip install 'kiln-vision[train]')") from None
    entry = model_entry(model)  # an unknown name is a 400 naming the nearest ones
    side = max(image_size or entry.default_size or 224, entry.min_size)
    s = studio(request)
    with s.cost_lock:  # one model built at a time: building the large ones takes seconds of CPU
        try:
            cost = _cost(model, side, classes, channels)
        except (RuntimeError, ValueError) as exc:  # e.g. an input too small for the architecture
            raise HTTPException(400, f"{model} at {side}x{side}: {str(exc).splitlines()[0]}") from None
    return {"model": model, "task": entry.task, "image_size": side, "classes": classes, "channels": channels,
            **cost}


@functools.lru_cache(maxsize=512)
def _cost(model: str, side: int, classes: int, channels: int) -> dict[str, float]:
    from kiln.bundle import Architecture
    from kiln.models import build_model, model_cost

    net = build_model(
        Architecture(name=model, args={"num_classes": classes, "in_channels": channels, "image_size": side}))
    return model_cost(net, (channels, side, side))


@router.post("/train/command")
def train_command(request: Request, form: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """The ``kiln train`` command the form stands for (run from the workspace)."""
    s = studio(request)
    given, name = _form(s, form)
    argv = forms.train_argv(given, f"{forms.RUNS_DIR}/{name}")
    return {"argv": argv, "command": forms.command_line(argv), "cwd": str(s.cfg.workspace)}


@router.post("/train/resolve")
def train_resolve(request: Request, form: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """What ``kiln train`` would fill in for the blank fields, from the same resolver over the dataset."""
    s = studio(request)
    given, _ = _form(s, form)
    try:
        from kiln.data import open_dataset
        from kiln.train.config import TrainConfig
        from kiln.train.resolve import resolve_settings
    except ModuleNotFoundError as exc:
        raise HTTPException(501, f"{exc.name} is not installed: training needs the 'train' extra "
                                 "(pip install 'kiln-vision[train]')") from None
    cfg = TrainConfig(**given)
    train_raw, _ = open_dataset(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                skip_bad_images=cfg.skip_bad_images)
    st = resolve_settings(cfg.replace(out="unused"), train_raw)
    return {"model": st.cfg.model, "task": st.task.name, "batch_size": st.batch_size,
            "lr": st.cfg.learning_rate,
            "warmup_epochs": st.cfg.warmup_epochs, "image_size": list(st.pre.size),
            "channels": st.arch.args["in_channels"], "image_size_reason": st.input_size.reason,
            "workers": st.workers, "classes": st.classes, "train_images": len(train_raw)}


@router.post("/runs", status_code=202)
def start_run(request: Request, form: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Queue a ``kiln train`` run; with ``"queue": false`` it starts now or is refused while another runs."""
    s = studio(request)
    form = dict(form)
    queue = bool(form.pop("queue", True))
    given, name = _form(s, form)
    rel = f"{forms.RUNS_DIR}/{name}"
    if (s.cfg.workspace / rel).exists() or s.store.list(run=rel, states=("queued", "running")):
        raise HTTPException(409, f"{rel} already exists in the workspace; pick another name")
    if not queue and s.store.list(states=("queued", "running"), kind="train"):
        raise HTTPException(409, "a run is already training (one run at a time); queue this one instead")
    argv = forms.train_argv(given, rel)
    job = s.store.add("train", rel, [argv],
                      {"command": forms.command_line(argv), "epochs": given.get("epochs")})
    return {"run": rel, "job": job.public(), "command": forms.command_line(argv)}


@router.get("/runs")
def list_runs(request: Request) -> list[dict[str, Any]]:
    s = studio(request)
    out = []
    seen = set()
    for path in s.runs():
        rel = s.rel(path)
        seen.add(rel)
        out.append({**summary(path, rel), "state": _state(s, rel, path)})
    for job in s.store.list(kind="train", states=("queued", "running")):
        if job.run not in seen:  # queued, or started but not yet written its config.json
            seen.add(job.run)
            out.append({"run": job.run, "state": job.state, "epochs": job.info.get("epochs"),
                        "epochs_done": 0,
                        "best": {}, "artifacts": [], "bundle": False})
    return out


@router.get("/run")
def get_run(request: Request, run: str = Query(...)) -> dict[str, Any]:
    s = studio(request)
    return _snapshot(s, run)


@router.get("/run/events")
async def run_events(request: Request, run: str = Query(...)) -> StreamingResponse:
    """Server-sent events: a ``run`` event with the whole snapshot whenever it changes (metrics.csv gains an
    epoch, the progress bar moves, the state changes), checked every 0.25 s; a comment every 10 s."""
    s = studio(request)
    s.run_dir(run, must_exist=False)

    async def stream() -> Any:
        last = ""
        beat = time.monotonic()
        yield "retry: 1000\n\n"
        while not await request.is_disconnected():
            snap = await asyncio.to_thread(_snapshot, s, run)
            text = json.dumps(snap)
            if text != last:
                last = text
                beat = time.monotonic()
                yield f"event: run\ndata: {text}\n\n"
            elif time.monotonic() - beat > HEARTBEAT_S:
                beat = time.monotonic()
                yield ": keep-alive\n\n"
            await asyncio.sleep(EVENT_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.post("/run/stop")
def stop_run(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    s = studio(request)
    run = str(body.get("run", ""))
    s.run_dir(run, must_exist=False)
    job = s.active_job(run)
    if job is None:
        raise HTTPException(409, f"{run} is not queued or running")
    s.runner.stop(job)
    return {"job": (s.store.get(job.id) or job).public()}


@router.post("/run/resume", status_code=202)
def resume_run(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """``kiln train --resume RUN`` (optionally ``--epochs N``, to train further), queued."""
    s = studio(request)
    run = str(body.get("run", ""))
    path = s.run_dir(run)
    if s.active_job(run) is not None:
        raise HTTPException(409, f"{run} is already queued or running")
    if not (path / "last.pt").is_file():
        raise HTTPException(409, f"{run} has no checkpoint to resume from (last.pt)")
    argv = ["train", f"--resume={run}"]
    if body.get("epochs"):
        try:
            epochs = int(body["epochs"])
        except (TypeError, ValueError):
            raise HTTPException(400, f"epochs: expected an integer, got {body['epochs']!r}") from None
        argv.append(f"--epochs={epochs}")
    job = s.store.add("train", run, [argv], {"command": forms.command_line(argv), "resume": True})
    return {"run": run, "job": job.public(), "command": forms.command_line(argv)}


@router.delete("/run")
def delete_run(request: Request, run: str = Query(...)) -> dict[str, Any]:
    s = studio(request)
    path = s.run_dir(run)
    if s.active_job(run) is not None or s.store.list(run=run, kind="serve", states=("queued", "running")):
        raise HTTPException(409, f"{run} is queued, running or being served; stop it first")
    if not ((path / "config.json").is_file() or (path / "kiln.json").is_file()):
        raise HTTPException(400, f"{run} is not a run folder (no config.json or kiln.json)")
    shutil.rmtree(path)
    s.store.delete_run(run)
    return {"deleted": run}


@router.get("/jobs")
def list_jobs(request: Request) -> list[dict[str, Any]]:
    return [j.public() for j in studio(request).store.list()]


def _form(s: Studio, form: dict[str, Any]) -> tuple[dict[str, Any], str]:
    try:
        given = forms.parse_form({k: v for k, v in form.items() if k != "name"}, s.cfg.roots)
        return given, forms.run_name(form, given)
    except KilnError as exc:
        raise HTTPException(403 if isinstance(exc, PathRefused) else 400, str(exc)) from None


def _state(s: Studio, rel: str, path: Any) -> str:
    job = s.latest_job(rel, "train")
    if job is not None and (job.state in ("queued", "running", "failed", "stopped", "interrupted")):
        return job.state
    info = summary(path, rel)
    if info["epochs_done"] and info["epochs_done"] < info["epochs"]:
        return "incomplete"
    return "done" if info["bundle"] else "incomplete"


def _snapshot(s: Studio, run: str) -> dict[str, Any]:
    path = s.run_dir(run, must_exist=False)
    rows = read_metrics(path)
    job = s.latest_job(run, "train")
    raw = raw_tail(s.runner.log_path(job)) if job else ""
    log = tail(Path(), data=raw)
    prog = progress(raw) if job and job.state == "running" else None
    info = summary(path, run) if path.is_dir() else {"run": run,
                                                     "epochs": job.info.get("epochs") if job else 0}
    epochs = int(info.get("epochs") or 0)
    state = _state(s, run, path) if path.is_dir() else (job.state if job else "missing")
    return {**info, "state": state, "metrics": rows, "progress": prog, "steps": step_points(raw),
            "eta_s": eta_seconds(rows, epochs, prog) if state == "running" else None,
            "log": "\n".join(log.splitlines()[-40:]), "job": job.public() if job else None}
