"""Compare, Export, Test, Serve and downloads through the studio's API, on a trained digits bundle."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from .conftest import WRITE, copy_bundle, runner, wait_for


def digit_png(index: int = 0) -> tuple[bytes, int]:
    """A digit from scikit-learn's set (8x8, 16 levels) as a 28x28 PNG, and its label."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = Image.fromarray((d.images[index] * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue(), int(d.target[index])


@pytest.fixture
def two_runs(workspace: Path, digits_bundle: Path) -> tuple[str, str]:
    a = copy_bundle(digits_bundle, workspace, "a")
    b = copy_bundle(digits_bundle, workspace, "b")
    metrics = workspace / b / "metrics.csv"
    metrics.write_text("\n".join(metrics.read_text().splitlines()[:3]) + "\n")  # b: 2 epochs
    return a, b


def test_compare_gives_curves_parameters_and_sizes(client: TestClient, two_runs: tuple[str, str],
                                                   workspace: Path) -> None:
    a, b = two_runs
    manifest = json.loads((workspace / b / "kiln.json").read_text())
    manifest["training"].pop("parameters")  # as a bundle from before kiln.json recorded it
    (workspace / b / "kiln.json").write_text(json.dumps(manifest))
    rows = client.get("/api/compare", params=[("run", a), ("run", b)]).json()
    assert [r["run"] for r in rows] == [a, b]
    assert [len(r["metrics"]) for r in rows] == [4, 2]
    assert rows[0]["params"] == 61_706  # LeNet-5 for 10 classes: conv, conv, fc 120, fc 84, fc 10
    assert 0 < rows[0]["gflops"] < 0.01
    assert rows[1]["params"] == 61_706  # counted from model.pt
    assert rows[0]["artifacts"][0]["file"] == "model.pt" and rows[0]["artifacts"][0]["size"] > 200_000
    assert client.get("/api/compare", params={"run": "runs/none"}).status_code == 404


def test_test_panel_predicts_top_k_with_latency(client: TestClient, two_runs: tuple[str, str],
                                                tmp_path: Path) -> None:
    data, label = digit_png(0)
    from sklearn.datasets import load_sample_images

    photo = io.BytesIO()
    Image.fromarray(load_sample_images().images[1]).save(photo, "JPEG")
    files = [("files", ("zero.png", data, "image/png")),
             ("files", ("flower.jpg", photo.getvalue(), "image/jpeg")),
             ("files", ("broken.png", b"not an image", "image/png"))]
    r = client.post("/api/predict", params={"run": two_runs[0]}, files=files, headers=WRITE)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "classify" and body["backend"] in ("onnxrt", "torch")
    first, photo_res, broken = body["results"]
    assert first["top_k"][0]["label"] == str(label) and first["ms"] > 0
    assert len(first["top_k"]) == 5 and sum(t["score"] for t in first["top_k"]) <= 1.0 + 1e-6
    assert (photo_res["width"], photo_res["height"]) == (640, 427)
    assert "error" in broken and broken["name"] == "broken.png"
    # no header
    assert client.post("/api/predict", params={"run": two_runs[0]}, files=files).status_code == 403


def test_export_runs_kiln_export_and_reads_the_bench_table(client: TestClient,
                                                           two_runs: tuple[str, str]) -> None:
    run = two_runs[0]
    body = {"run": run, "precisions": ["fp32", "int8"], "calib_method": "minmax", "calib_images": 64,
            "bench_iters": 3}
    assert client.post("/api/export", json={**body, "precisions": ["fp64"]}, headers=WRITE).status_code == 400
    r = client.post("/api/export", json=body, headers=WRITE)
    assert r.status_code == 202, r.text
    assert r.json()["command"] == ("kiln export --precision=fp32,int8 --calib-method=minmax "
                                   "--int8-layout=tensorrt "
                                   f"--calib-images=64 {run} && kiln eval {run} --bench --json "
                                   "--bench-iters=3")
    assert client.post("/api/export", json=body, headers=WRITE).status_code == 409  # queued already
    job = runner(client).wait(r.json()["job"]["id"], 600)
    assert job.state == "done", Path(job.log).read_text()[-3000:]
    table = client.get("/api/run/table", params={"run": run}).json()["table"]
    files = {row["file"]: row for row in table["artifacts"]}
    assert {"model.pt", "model.onnx", "model.int8.onnx"} <= set(files)
    for row in files.values():
        assert row["metrics"]["top1"] > 50 and row["p50_ms_b1"] > 0 and row["size_mb"] > 0
    assert files["model.int8.onnx"]["precision"] == "int8"


def test_serve_starts_kiln_serve_and_the_copied_curl_line_works(client: TestClient, two_runs: tuple[str, str],
                                                                tmp_path: Path) -> None:
    run = two_runs[0]
    r = client.post("/api/serve", json={"run": run}, headers=WRITE)
    assert r.status_code == 202, r.text
    assert client.post("/api/serve", json={"run": run}, headers=WRITE).status_code == 409
    jobs = runner(client)
    job_id = r.json()["job"]["id"]
    try:
        jobs.tick()
        server = wait_for(lambda: next((s for s in client.get("/api/serve").json() if s["ready"]), None), 120,
                          "kiln serve to be ready", interval=0.3)
        data, label = digit_png(3)
        # the snippet names image.jpg; curl sends whatever it holds
        (tmp_path / "image.jpg").write_bytes(data)
        out = subprocess.run(shlex.split(server["snippets"]["curl"]), cwd=tmp_path, capture_output=True,
                             text=True,
                             timeout=60)
        answer = json.loads(out.stdout)
        assert answer["predictions"][0]["top_k"][0]["label"] == str(label)
        for name in ("python", "tritonclient"):  # the other snippets run as copied
            ran = subprocess.run([sys.executable, "-c", server["snippets"][name]], cwd=tmp_path,
                                 capture_output=True,
                                 text=True, timeout=120)
            assert ran.returncode == 0, (name, ran.stderr[-2000:])
            assert "digits-cli" in ran.stdout or "top_k" in ran.stdout or "outputs" in ran.stdout, ran.stdout
        assert client.post("/api/serve/stop", json={"id": job_id}, headers=WRITE).status_code == 200
        assert jobs.wait(job_id, 60).state == "stopped"
        with pytest.raises(httpx.TransportError):
            httpx.get(server["url"] + "/readyz", timeout=2)
    finally:
        job = client.app.state.studio.store.get(job_id)  # type: ignore[attr-defined]
        if job.state == "running":
            jobs.stop(job)
            jobs.wait(job_id, 30)


def test_downloads_give_an_artifact_and_the_bundle_zip(client: TestClient, two_runs: tuple[str, str],
                                                       workspace: Path) -> None:
    run = two_runs[0]
    r = client.get("/api/download", params={"run": run, "file": "model.pt"})
    assert r.status_code == 200 and r.content == (workspace / run / "model.pt").read_bytes()
    assert client.get("/api/download", params={"run": run, "file": "nope.onnx"}).status_code == 404
    r = client.get("/api/download/bundle", params={"run": run})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert "a/kiln.json" in names and "a/model.pt" in names
    assert not any(n.endswith(("last.pt", "best.pt")) or "tensorboard" in n for n in names)
    assert not list((workspace / ".studio").glob("*.zip"))  # the temporary zip is gone


def test_datasets_are_added_from_the_allowed_roots(client: TestClient, photo_folder: Path) -> None:
    r = client.post("/api/datasets", json={"spec": f"folder:{photo_folder}"}, headers=WRITE)
    assert r.status_code == 201 and r.json()["task"] == "classify"
    assert (
        client.post(
            "/api/datasets", json={"spec": "folder:" + str(photo_folder / "missing")}, headers=WRITE
        ).status_code
        == 404
    )
    assert client.post("/api/datasets", json={"spec": "nosuch:x"}, headers=WRITE).status_code == 400
    assert [d["spec"] for d in client.get("/api/datasets").json()] == [f"folder:{photo_folder}"]
    listing = client.get("/api/fs", params={"path": str(photo_folder)}).json()
    assert [e["name"] for e in listing["entries"]] == ["china", "flower"]
    report = client.get("/api/datasets/inspect", params={"spec": f"folder:{photo_folder}"}).json()
    assert report["classes"] == ["china", "flower"]
    assert {
        c: report["train"]["per_class"][c] + report["val"]["per_class"][c] for c in report["classes"]
    } == {"china": 8, "flower": 8}
    sheet = client.get("/api/datasets/sheet", params={"spec": f"folder:{photo_folder}", "per_class": 4})
    # a row per class
    assert sheet.status_code == 200 and Image.open(io.BytesIO(sheet.content)).height >= 2 * 64
    # never added
    assert client.get("/api/datasets/inspect", params={"spec": "folder:/etc"}).status_code == 404
    thumb = client.get("/api/thumb", params={"path": str(photo_folder / "china" / "china-0.jpg"), "size": 32})
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (32, 32)


def test_resolve_fills_blank_fields_as_kiln_train_would(client: TestClient, photo_folder: Path) -> None:
    from kiln.data import open_dataset
    from kiln.train.config import TrainConfig
    from kiln.train.resolve import resolve_settings

    form = {"data": f"folder:{photo_folder}", "epochs": 3}
    r = client.post("/api/train/resolve", json=form, headers=WRITE)
    assert r.status_code == 200, r.text
    expected = resolve_settings(TrainConfig(**form, out="x"), open_dataset(form["data"])[0])  # type: ignore[arg-type]
    got = r.json()
    assert (got["model"], got["batch_size"], got["image_size"]) == (
        expected.cfg.model,
        expected.batch_size,
        list(expected.pre.size),
    )
    assert got["image_size"] == [64, 64] and got["classes"] == ["china", "flower"]


def test_model_list_has_kiln_and_torchvision_classifiers(client: TestClient) -> None:
    models = client.get("/api/train/models").json()
    assert "lenet5" in models["kiln"] and "kiln-det-s" in models["kiln"]
    assert "convnext_tiny" in models["torchvision"] and "resnet18" in models["torchvision"]
    assert not any(n.startswith(("fasterrcnn", "deeplab")) for n in models["torchvision"])  # classifiers only
