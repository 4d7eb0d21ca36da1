"""A detector's end-to-end graph (`kiln export --nms`): NMS inside, EfficientNMS-style outputs, the same
boxes as kiln's post-processing of the raw graph, in ONNX Runtime, through the runtime and through
`kiln serve`."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from kiln.bundle import Bundle
from kiln.cli import main
from kiln.evaluate import bundle_split
from kiln.outputs import predictions
from kiln.processing import DetectControlError, detect_overrides, detect_postprocess, preprocess
from kiln.runtime import load, open_artifact
from tests.serve.conftest import kiln_serve, wait_ready

BOX_TOL_PX = 1e-3  # the end-to-end graph gathers the raw graph's own numbers: equal to float rounding


@pytest.fixture(scope="module")
def nms_master(det_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The detector exported once with `--nms` (fp32 raw + end-to-end graph); copy before writing."""
    root = Path(shutil.copytree(det_master, tmp_path_factory.mktemp("nms") / "shapes"))
    old = os.environ.get("KILN_SHAPES_COUNT")
    os.environ["KILN_SHAPES_COUNT"] = "48"
    try:
        assert main(["export", str(root), "--nms", "--batch", "1:2:4", "--no-simplify"]) == 0
    finally:
        if old is None:
            os.environ.pop("KILN_SHAPES_COUNT", None)
        else:
            os.environ["KILN_SHAPES_COUNT"] = old
    return root


def _val(bundle: Bundle, count: int = 8) -> tuple[np.ndarray, list]:
    val = bundle_split(bundle, "val")
    return preprocess([val.image(i) for i in range(min(count, len(val)))], bundle.manifest.preprocess)


def _same(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert [len(r) for r in a] == [len(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert [d["label"] for d in ra] == [d["label"] for d in rb]
        for da, db in zip(ra, rb, strict=True):
            assert (
                np.allclose(da["box"], db["box"], atol=BOX_TOL_PX) and abs(da["score"] - db["score"]) <= 1e-6
            )


def test_nms_export_records_settings_outputs_and_verification(nms_master: Path) -> None:
    import onnx

    b = Bundle.load(nms_master)
    art = b.manifest.artifacts["model.nms.onnx"]
    extra = art.model_dump()
    post = b.manifest.detect_post()
    assert extra["nms"]["score_threshold"] == post.score_threshold and extra["nms"]["max_detections"] == 100
    assert extra["nms"]["class_agnostic"] is False
    assert [o["name"] for o in extra["outputs"]] == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    v = extra["verification"]
    assert v["passed"] and v["detections"] > 0 and v["max_box_diff_px"] <= BOX_TOL_PX
    assert extra["source_sha256"] == b.manifest.artifacts["model.onnx"].sha256
    meta = {p.key: p.value for p in onnx.load(str(nms_master / "model.nms.onnx")).metadata_props}
    assert (
        meta["kiln.nms.iou_threshold"] == str(post.iou_threshold) and meta["kiln.nms.max_detections"] == "100"
    )
    # the raw graph stays what load() opens: eval, compare and the raw consumers never get the other outputs
    with load(b, backend="onnxrt") as backend:
        assert backend.artifact == "model.onnx"


@pytest.mark.parametrize("agnostic", [False, True])
def test_end_to_end_graph_in_onnxruntime_gives_kiln_postprocessing_boxes(nms_master: Path, tmp_path: Path,
                                                                         agnostic: bool) -> None:
    """Shapes: int32 num_dets [N, 1], det_boxes [N, K, 4], padding zeros; K above the anchor count pads."""
    import onnxruntime as ort

    from kiln.export.onnx2nms import NmsSettings, onnx2nms

    b = Bundle.load(nms_master)
    x, _ = _val(b)
    boxes, scores = ort.InferenceSession(str(nms_master / "model.onnx")).run(
        ["boxes", "scores"], {"images": x}
    )
    anchors = boxes.shape[1]
    settings = NmsSettings(score_threshold=0.02, iou_threshold=0.3, max_detections=anchors + 7,
                           class_agnostic=agnostic)
    onnx2nms(nms_master / "model.onnx", tmp_path / "e2e.onnx", boxes="boxes", scores="scores",
             settings=settings)
    num, det_boxes, det_scores, det_classes = ort.InferenceSession(str(tmp_path / "e2e.onnx")).run(
        ["num_dets", "det_boxes", "det_scores", "det_classes"], {"images": x})
    assert num.dtype == np.int32 and num.shape == (len(x), 1) and det_classes.dtype == np.int32
    assert det_boxes.shape == (len(x), anchors + 7, 4) and det_scores.shape == (len(x), anchors + 7)
    post = b.manifest.detect_post().model_copy(update={"iou_threshold": 0.3, "max_detections": anchors + 7,
                                                       "class_agnostic": agnostic})
    ref = detect_postprocess(boxes, scores, None, post, b.manifest.classes)
    for i, r in enumerate(ref):
        n = int(num[i, 0])
        assert n == len(r) and n > 0
        assert det_classes[i, :n].tolist() == [d["index"] for d in r]
        assert np.allclose(det_boxes[i, :n], [d["box"] for d in r], atol=BOX_TOL_PX)
        assert np.allclose(det_scores[i, :n], [d["score"] for d in r], atol=1e-6)
        assert not det_boxes[i, n:].any() and not det_scores[i, n:].any()


def test_runtime_answers_the_same_boxes_from_either_graph(nms_master: Path) -> None:
    b = Bundle.load(nms_master)
    x, letterboxes = _val(b)
    with load(b, backend="onnxrt") as raw, load(b, backend="onnxrt", end_to_end=True) as e2e:
        assert e2e.artifact == "model.nms.onnx" and [o.name for o in e2e.outputs][0] == "num_dets"
        want = predictions(b.manifest, raw.infer({"images": x}), letterboxes)
        got = predictions(b.manifest, e2e.infer({"images": x}), letterboxes)
        _same([p["boxes"] for p in want], [p["boxes"] for p in got])
        assert sum(len(p["boxes"]) for p in got) > 0
        # a request may narrow what the graph kept; it cannot undo its NMS
        out = e2e.infer({"images": x})
        stricter = detect_overrides(b.manifest.detect_post(), b.manifest.classes, conf=0.1, max_det=2)
        narrow = predictions(b.manifest, out, letterboxes, detect=stricter)
        wanted = predictions(b.manifest, raw.infer({"images": x}), letterboxes, detect=stricter)
        _same([p["boxes"] for p in wanted], [p["boxes"] for p in narrow])
        other_iou = detect_overrides(b.manifest.detect_post(), b.manifest.classes, iou=0.9)
        with pytest.raises(DetectControlError, match="NMS inside its graph"):
            predictions(b.manifest, out, letterboxes, detect=other_iou)


def test_end_to_end_serving_needs_the_graph(det_master: Path) -> None:
    from kiln import runtime
    from kiln.errors import BackendUnavailable

    b = Bundle.load(det_master)
    with pytest.raises(BackendUnavailable, match="--nms"):
        runtime.preflight(b, "auto", end_to_end=True)
    with pytest.raises(BackendUnavailable, match="no end-to-end"):
        load(b, end_to_end=True)


def test_kiln_serve_v1_answers_the_same_boxes_from_either_graph(nms_master: Path) -> None:
    """/v1 from the raw and the end-to-end graph; tritonclient's v2 outputs of each, decoded as docs/serve.md
    shows, give /v1's boxes too."""
    import io

    import tritonclient.http as httpclient

    docs = _docs_decoder()
    b = Bundle.load(nms_master)
    post = b.manifest.detect_post()
    val = bundle_split(b, "val")
    blobs = []
    for i in range(3):
        buf = io.BytesIO()
        val.image(i).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    answers = []
    for extra in ([], ["--end-to-end"]):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "kiln.cli", "serve", str(nms_master), "--name", "shapes", "--port", "0",
               "--backend", "onnxrt", *extra]
        with kiln_serve(cmd, env) as (proc, url, lines), httpx.Client(base_url=url, timeout=30) as client:
            wait_ready(client, proc, lines, 60)
            info = client.get("/v1/models/shapes").json()
            assert [o["name"] for o in info["outputs"]][0] == ("num_dets" if extra else "boxes")
            r = client.post("/v1/models/shapes/predict", files=[("file", (f"{i}.png", blob, "image/png"))
                                                                for i, blob in enumerate(blobs)])
            assert r.status_code == 200, r.text
            answers.append([p["boxes"] for p in r.json()["predictions"]])
            x, (lb,) = _val(b, 1)
            v2 = client.post("/v2/models/shapes/infer", json={"inputs": [
                {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]})
            assert v2.status_code == 200, v2.text
            assert [o["name"] for o in v2.json()["outputs"]] == (
                ["num_dets", "det_boxes", "det_scores", "det_classes"] if extra else ["boxes", "scores"])
            config = client.get("/v2/models/shapes/config").json()  # Triton's model configuration
            assert [o["name"] for o in config["output"]] == [o["name"] for o in v2.json()["outputs"]]
            assert ("nms.iou_threshold" in config["parameters"]) == bool(extra)
            tc = httpclient.InferenceServerClient(url.removeprefix("http://"))
            inp = httpclient.InferInput("images", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            res = tc.infer("shapes", [inp])
            place = (lb.scale_x, lb.scale_y, lb.pad_x, lb.pad_y, lb.width, lb.height)
            if extra:
                xyxy, scores, classes = docs["decode_end_to_end"](
                    *(res.as_numpy(n)[0] for n in ("num_dets", "det_boxes", "det_scores", "det_classes")),
                    *place)
            else:
                xyxy, scores, classes = docs["decode_raw"](res.as_numpy("boxes")[0],
                                                           res.as_numpy("scores")[0], *place,
                                                           conf=post.score_threshold, iou=post.iou_threshold,
                                                           max_det=post.max_detections)
            tc.close()
            _same([answers[-1][0]],
                  [[{"box": list(bx), "label": b.manifest.classes[int(c)], "score": float(s)}
                                      for bx, s, c in zip(xyxy, scores, classes, strict=True)]])
    assert sum(len(x) for x in answers[0]) > 0
    _same(answers[0], answers[1])


def test_open_artifact_runs_the_end_to_end_graph(nms_master: Path) -> None:
    b = Bundle.load(nms_master)
    x, _ = _val(b, 2)
    with open_artifact(b, "model.nms.onnx") as backend:
        out = backend.infer({"images": x})
    assert set(out) == {"num_dets", "det_boxes", "det_scores", "det_classes"}


def test_triton_repository_holds_the_end_to_end_graph_by_default(nms_master: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.export.triton import read_config

    monkeypatch.setenv("KILN_SHAPES_COUNT", "48")
    bundle = Path(shutil.copytree(nms_master, tmp_path / "shapes"))
    repo = tmp_path / "models"
    assert main(["export", str(bundle), "--precision", "fp16", "--nms", "--nms-max-det", "20", "--batch",
                 "1:2:4",
                 "--triton-repo", str(repo)]) == 0
    folder = repo / "shapes"
    assert (folder / "1" / "model.onnx").read_bytes() == (bundle / "model.fp16.nms.onnx").read_bytes()
    cfg = read_config(folder / "config.pbtxt")  # tritonclient's ModelConfig, through text_format
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 4
    outs = {o.name: o for o in cfg.output}
    assert list(outs) == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    assert list(outs["num_dets"].dims) == [1] and outs["num_dets"].data_type == 8  # TYPE_INT32
    assert list(outs["det_boxes"].dims) == [20, 4] and outs["det_classes"].label_filename == "labels.txt"
    assert (folder / "labels.txt").read_text().splitlines() == Bundle.load(bundle).manifest.classes
    assert "NMS applied" in cfg.parameters["output.det_boxes.description"].string_value
    assert cfg.parameters["nms.max_detections"].string_value == "20"
    assert cfg.parameters["nms.class_agnostic"].string_value == "false"
    # the raw graph on request
    assert main(["export", str(bundle), "--precision", "fp16", "--batch", "1:2:4", "--triton-repo", str(repo),
                 "--triton-raw"]) == 0
    assert [o.name for o in read_config(folder / "config.pbtxt").output] == ["boxes", "scores"]


def _docs_decoder() -> dict:
    """The numpy decoding block of docs/serve.md, executed as a user would paste it."""
    text = (Path(__file__).parents[2] / "docs" / "serve.md").read_text()
    section = text.split("### Detectors: decoding the raw outputs", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/serve.md", "exec"), namespace)
    return namespace


def test_docs_numpy_decoding_matches_v1_boxes_for_both_graphs(nms_master: Path) -> None:
    import onnxruntime as ort

    docs = _docs_decoder()
    b = Bundle.load(nms_master)
    x, letterboxes = _val(b)
    raw = dict(zip(["boxes", "scores"], ort.InferenceSession(str(nms_master / "model.onnx")).run(
        ["boxes", "scores"], {"images": x}), strict=True))
    names = ["num_dets", "det_boxes", "det_scores", "det_classes"]
    e2e = dict(zip(names, ort.InferenceSession(str(nms_master / "model.nms.onnx")).run(names, {"images": x}),
                   strict=True))
    # what /v1 answers: with kiln.json's settings (the end-to-end graph's), and with every survivor kept
    # at a lower IoU, where per-class and cross-class NMS differ on this detector
    every = detect_overrides(b.manifest.detect_post(), b.manifest.classes, iou=0.3, max_det=10_000)
    want = predictions(b.manifest, raw, letterboxes)
    want_every = predictions(b.manifest, raw, letterboxes, detect=every)
    total = 0
    for i, lb in enumerate(letterboxes):
        place = (lb.scale_x, lb.scale_y, lb.pad_x, lb.pad_y, lb.width, lb.height)
        raw_decoded = docs["decode_raw"](raw["boxes"][i], raw["scores"][i], *place,
                                         conf=every.score_threshold,
                                         iou=every.iou_threshold, max_det=every.max_detections)
        e2e_decoded = docs["decode_end_to_end"](*(e2e[n][i] for n in names), *place)
        for (xyxy, scores, classes), p in ((raw_decoded, want_every[i]), (e2e_decoded, want[i])):
            assert len(xyxy) == len(p["boxes"]) and list(classes) == [d["index"] for d in p["boxes"]]
            assert np.allclose(xyxy, [d["box"] for d in p["boxes"]], atol=1e-3)
            assert np.allclose(scores, [d["score"] for d in p["boxes"]], atol=1e-6)
            total += len(p["boxes"])
    assert total > 0


def test_nms_on_a_classifier_is_a_one_line_error(tmp_path: Path) -> None:
    from kiln.bundle import Architecture, InputSpec, Manifest, Preprocess, TensorSpec
    from kiln.errors import ConfigError
    from kiln.export.pipeline import ExportOptions, preflight

    manifest = Manifest(kiln_version="test", task="classify", classes=["a", "b"],
                        input=InputSpec(name="images", shape=[1, 28, 28]),
                        outputs=[TensorSpec(name="logits", shape=[2])],
                        preprocess=Preprocess(size=(28, 28), channels="L", mean=[0.5], std=[0.5]),
                        architecture=Architecture(name="lenet5"))
    with pytest.raises(ConfigError, match="--nms puts a detector's NMS inside its graph"):
        preflight(Bundle(tmp_path, manifest), ExportOptions(nms=True))


def test_nms_threshold_out_of_range_fails_before_any_export(det_master: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    bundle = Path(shutil.copytree(det_master, tmp_path / "shapes"))
    assert main(["export", str(bundle), "--nms", "--nms-iou", "1.5"]) != 0
    assert "--nms-iou: must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert "model.onnx" not in Bundle.load(bundle).manifest.artifacts


def test_eval_table_of_a_bundle_with_end_to_end_graphs_runs_the_raw_ones(
    nms_master: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.compare import artifact_table

    monkeypatch.setenv("KILN_SHAPES_COUNT", "48")
    rows = artifact_table(Bundle.load(nms_master), limit=4)
    assert [r["file"] for r in rows] == ["model.pt", "model.onnx"] and all("error" not in r for r in rows)
