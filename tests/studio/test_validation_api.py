"""The Test page's validation split (confusion matrix, the images of each cell) and the New run form's
parameters/GFLOPs, through the studio's API on a trained digits bundle."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from .conftest import copy_bundle


def test_validation_confusion_matches_kiln_eval_and_lists_each_cells_images(
    client: TestClient, workspace: Path, digits_bundle: Path
) -> None:
    from kiln.bundle import Bundle
    from kiln.evaluate import evaluate_backend
    from kiln.runtime import load

    run = copy_bundle(digits_bundle, workspace, "digits")
    r = client.get("/api/val", params={"run": run})
    assert r.status_code == 200, r.text
    val = r.json()
    bundle = Bundle.load(workspace / run)
    backend = load(bundle)
    try:
        expected = evaluate_backend(bundle, backend)  # what kiln eval computes
    finally:
        backend.close()
    assert val["task"] == "classify" and val["classes"] == bundle.manifest.classes
    assert val["count"] == val["split_size"] == expected["count"]
    assert val["confusion"] == expected["confusion"].tolist()  # rows: true class, columns: predicted
    assert abs(val["top1"] - expected["top1"]) < 1e-9
    confusion = np.zeros((10, 10), dtype=int)
    for im in val["images"]:
        confusion[im["true"], im["pred"]] += 1
        assert 0.1 <= im["score"] <= 1.0
    assert confusion.tolist() == val["confusion"]  # each cell's images are the images the cell counts
    wrong = [im for im in val["images"] if im["true"] != im["pred"]]
    assert 0 < len(wrong) < val["count"] // 4  # a 4-epoch LeNet-5: some, not many, misclassified

    # a misclassified image, as the page fetches it to show and to send through /api/predict
    miss = wrong[0]
    png = client.get("/api/val/image", params={"run": run, "i": miss["i"]})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(png.content))
    assert img.size == (8, 8) and img.mode == "L"  # scikit-learn's digits as the split holds them
    files = [("files", ("val.png", png.content, "image/png"))]
    answer = client.post("/api/predict", params={"run": run}, files=files,
                         headers={"X-Kiln-Studio": "1"}).json()
    assert answer["results"][0]["top_k"][0]["label"] == val["classes"][miss["pred"]]
    thumb = client.get("/api/val/image", params={"run": run, "i": 0, "size": 16})
    assert Image.open(io.BytesIO(thumb.content)).size == (8, 8)  # a thumbnail never enlarges

    assert client.get("/api/val/image", params={"run": run, "i": val["count"]}).status_code == 404
    assert client.get("/api/val", params={"run": run, "precision": "fp64"}).status_code == 400
    assert client.get("/api/val", params={"run": "../outside"}).status_code == 403
    assert client.get("/api/val", params={"run": "runs/none"}).status_code == 404


def test_model_cost_is_kilns_model_cost_and_cached(client: TestClient) -> None:
    from kiln.studio import routes_runs

    r = client.get("/api/train/cost", params={"model": "resnet18", "image_size": 224, "classes": 1000})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"] == 11_689_512 and abs(body["gflops"] - 1.82) < 0.01  # torchvision's table
    hits = routes_runs._cost.cache_info().hits
    assert (
        client.get("/api/train/cost", params={"model": "resnet18", "image_size": 224, "classes": 1000}).json()
        == body
    )
    assert routes_runs._cost.cache_info().hits == hits + 1  # the second ask builds nothing
    lenet = client.get("/api/train/cost", params={"model": "lenet5", "channels": 1}).json()
    assert (lenet["image_size"], lenet["parameters"]) == (28, 61_706)  # the model's own side by default
    det = client.get("/api/train/cost", params={"model": "kiln-det-s", "classes": 3}).json()
    assert det["task"] == "detect" and det["image_size"] == 128 and det["gflops"] > 0
    unknown = client.get("/api/train/cost", params={"model": "resnet81"})
    assert unknown.status_code == 400 and "resnet18" in unknown.json()["error"]
    assert client.get("/api/train/cost", params={"model": "resnet18", "image_size": 5000}).status_code == 422
