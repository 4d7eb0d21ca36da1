"""Runs in the studio: started from the form as `kiln train` processes, one at a time, stopped cleanly and
resumed, found again after a restart, runs from the command line listed, live curves over SSE."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from kiln.fsutil import _start_time, atomic_write_text
from kiln.studio.app import build_app
from kiln.studio.config import StudioConfig
from kiln.studio.runs import eta_seconds, progress, step_points
from kiln.studio.store import JobStore

from .conftest import WRITE, LiveStudio, copy_bundle, runner, wait_for


def test_run_from_the_form_trains_as_kiln_train_and_runs_one_at_a_time(client: TestClient,
                                                                       workspace: Path) -> None:
    r = client.post("/api/runs", json={"epochs": 1, "name": "a", "optimizer": "sgd"}, headers=WRITE)
    assert r.status_code == 202
    assert r.json()["command"] == "kiln train --optimizer=sgd --epochs=1 --out=runs/a"
    b = client.post("/api/runs", json={"epochs": 1, "name": "b"}, headers=WRITE).json()
    jobs = runner(client)
    jobs.tick()
    states = {j["run"]: j["state"] for j in client.get("/api/jobs").json()}
    assert states == {"runs/a": "running", "runs/b": "queued"}
    r = client.post("/api/runs", json={"epochs": 1, "name": "c", "queue": False}, headers=WRITE)
    assert r.status_code == 409 and "one run at a time" in r.json()["error"]
    # same folder
    assert client.post("/api/runs", json={"epochs": 1, "name": "a"}, headers=WRITE).status_code == 409
    client.post("/api/run/stop", json={"run": "runs/b"}, headers=WRITE)  # a queued run never starts
    job = jobs.wait(1, 120)
    assert job.state == "done", Path(job.log).read_text()[-2000:]
    run = client.get("/api/run", params={"run": "runs/a"}).json()
    assert run["state"] == "done" and run["epochs_done"] == 1 and run["bundle"]
    assert run["metrics"][0]["epoch"] == 1 and "val_top1" in run["metrics"][0]
    saved = json.loads((workspace / "runs/a/config.json").read_text())
    assert saved["optimizer"] == "sgd" and saved["epochs"] == 1 and saved["data"] == "digits"
    jobs.tick()
    second = client.get("/api/jobs").json()[1]
    assert (second["run"], second["state"], second["started"]) == (b["run"], "stopped", None)


def test_stop_is_clean_and_resume_finishes_the_run(client: TestClient, workspace: Path) -> None:
    client.post("/api/runs", json={"epochs": 4, "name": "s"}, headers=WRITE)
    jobs = runner(client)
    jobs.tick()
    metrics = workspace / "runs/s/metrics.csv"
    wait_for(lambda: metrics.is_file(), 120, "the first epoch")
    assert client.delete("/api/run", params={"run": "runs/s"}, headers=WRITE).status_code == 409  # running
    r = client.post("/api/run/stop", json={"run": "runs/s"}, headers=WRITE)
    assert r.status_code == 200
    job = jobs.wait(1, 120)
    assert job.state == "stopped" and job.rc == 130, Path(job.log).read_text()[-2000:]
    run = client.get("/api/run", params={"run": "runs/s"}).json()
    assert run["state"] == "stopped" and run["resumable"] and 1 <= run["epochs_done"] < 4
    assert (workspace / "runs/s/model.pt").is_file()  # the bundle holds the best epoch so far
    r = client.post("/api/run/resume", json={"run": "runs/s"}, headers=WRITE)
    assert r.status_code == 202 and r.json()["command"] == "kiln train --resume=runs/s"
    jobs.tick()
    job = jobs.wait(2, 180)
    assert job.state == "done", Path(job.log).read_text()[-2000:]
    assert client.get("/api/run", params={"run": "runs/s"}).json()["epochs_done"] == 4
    assert client.post("/api/run/stop", json={"run": "runs/s"}, headers=WRITE).status_code == 409
    assert client.delete("/api/run", params={"run": "runs/s"}, headers=WRITE).status_code == 200
    assert not (workspace / "runs/s").exists()
    assert client.get("/api/run", params={"run": "runs/s"}).json()["state"] == "missing"


def test_restart_follows_a_live_job_and_marks_a_gone_one_interrupted(cfg: StudioConfig) -> None:
    store = JobStore(cfg.state_dir / "studio.db")
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        a = store.add("train", "runs/gone", [["train"]])
        store.update(a.id, state="running", pid=gone.pid, pid_start=time.time())
        b = store.add("train", "runs/live", [["train"]])
        store.update(b.id, state="running", pid=live.pid, pid_start=_start_time(live.pid))
        c = store.add("train", "runs/reused", [["train"]])  # the pid now belongs to another process
        store.update(c.id, state="running", pid=live.pid, pid_start=(_start_time(live.pid) or 0) - 3600)
        store.close()
        with TestClient(build_app(cfg, start_runner=False), base_url="http://127.0.0.1") as client:
            states = {j["run"]: j["state"] for j in client.get("/api/jobs").json()}
            assert states == {
                "runs/gone": "interrupted",
                "runs/live": "running",
                "runs/reused": "interrupted",
            }
            live.kill()
            live.wait()
            runner(client).tick()
            assert client.get("/api/jobs").json()[1]["state"] == "interrupted"
    finally:
        live.kill()
        live.wait()


def test_runs_started_from_the_command_line_appear(client: TestClient, workspace: Path,
                                                   digits_bundle: Path) -> None:
    copy_bundle(digits_bundle, workspace, "from-cli")
    (workspace / "notes").mkdir()
    runs = client.get("/api/runs").json()
    assert [r["run"] for r in runs] == ["runs/from-cli"]
    r = runs[0]
    assert (
        r["state"] == "done" and r["model"] == "lenet5" and r["epochs_done"] == 4 and r["best"]["top1"] > 80
    )


def test_curves_gain_a_point_over_server_sent_events(live_studio: LiveStudio, digits_bundle: Path) -> None:
    """The page's EventSource gets a new snapshot once metrics.csv has another epoch."""
    rel = copy_bundle(digits_bundle, live_studio.workspace, "live")
    csv_path = live_studio.workspace / rel / "metrics.csv"
    lines = csv_path.read_text().splitlines()
    atomic_write_text(csv_path, "\n".join(lines[:3]) + "\n")  # header + 2 epochs
    url, params = f"{live_studio.url}/api/run/events", {"run": rel}
    with httpx.stream("GET", url, params=params, timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _events(resp.iter_lines())
        assert len(next(events)["metrics"]) == 2
        with httpx.stream("GET", url, params=params, timeout=30) as other:  # a second tab, closed again
            assert len(next(_events(other.iter_lines()))["metrics"]) == 2
        atomic_write_text(csv_path, "\n".join(lines[:4]) + "\n")
        written = time.monotonic()
        assert len(next(events)["metrics"]) == 3
        # a deadline, not a benchmark (docs/BENCHMARKS.md has the figure)
        assert time.monotonic() - written < 10
    with httpx.stream("GET", url, params=params, timeout=30) as reloaded:  # a reload gets the current state
        assert len(next(_events(reloaded.iter_lines()))["metrics"]) == 3


def _events(lines):  # type: ignore[no-untyped-def]
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line[6:])


def test_progress_bar_updates_give_steps_and_eta() -> None:
    log = ("epoch 1/3:  50%|#####     | 10/20 [00:02<00:02, 5.0it/s, loss=1.2000, acc=40.0%, img/s=320]\r"
           "epoch 1/3: 100%|##########| 20/20 [00:04<00:00, 5.0it/s, loss=0.9000, acc=60.0%, img/s=320]\n"
           "epoch 2/3:  25%|##5       | 5/20 [00:01<00:03, 5.0it/s, loss=0.7000, acc=70.0%, img/s=320]\r")
    assert step_points(log) == [[0.5, 1.2], [1.0, 0.9], [1.25, 0.7]]
    p = progress(log)
    assert p == {
        "epoch": 2,
        "epochs": 3,
        "batch": 5,
        "batches": 20,
        "elapsed_s": 1.0,
        "remaining_s": 3.0,
        "loss": 0.7,
    }
    rows = [{"epoch": 1, "epoch_s": 4.0}]
    assert eta_seconds(rows, 3, p) == (3 - 1 - 0.25) * 4.0
    assert eta_seconds([], 3, {**p, "epoch": 1}) == (3 - 0.25) * 4.0  # from the bar alone: 1 s for a quarter
    assert eta_seconds(rows * 3, 3, None) == 0.0
