"""A detector over KServe v2 (HTTP and gRPC, tritonclient) with encoded images: its boxes come back in each
original image's pixels, so docs/serve.md's numpy decoding (with no letterbox left to undo) gives /v1's
boxes, from the raw graph and from the end-to-end graph (``kiln serve --end-to-end``); the v2 and gRPC
metadata of the end-to-end graph list its outputs and say what they hold."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from kiln.bundle import Bundle
from kiln.serve.settings import Settings
from tests.export.test_export_nms import _docs_decoder

from .triton_server import onnx_bundles, serve

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

__all__ = ["onnx_bundles"]  # a fixture, used by name

END_TO_END = ["num_dets", "det_boxes", "det_scores", "det_classes"]
BOX_TOL_PX = 1e-3


@pytest.fixture(scope="module")
def detector(onnx_bundles: dict[str, Bundle], tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The seeded kiln-det-s bundle with its end-to-end graph (``kiln export --nms``) beside the raw one."""
    from kiln.export.onnx2nms import NmsSettings, onnx2nms

    root = tmp_path_factory.mktemp("v2det") / "shapes"
    shutil.copytree(onnx_bundles["shapes"].root, root)
    bundle = Bundle.load(root)
    settings = NmsSettings.from_post(bundle.manifest.detect_post())
    info = onnx2nms(root / "model.onnx", root / "model.nms.onnx", boxes="boxes", scores="scores",
                    settings=settings)
    bundle.add_artifact("model.nms.onnx", "onnx", "fp32", **info)
    bundle.save()
    return bundle


def _photos() -> list[bytes]:
    """Real photos at odd sizes, 160x120 among them (the letterbox pads top and bottom or left and right)."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    out = []
    for arr, size in ((china, (160, 120)), (flower, (90, 200))):
        buf = io.BytesIO()
        Image.fromarray(arr).resize(size).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module", params=["raw", "end-to-end"])
def running(request: pytest.FixtureRequest, detector: Bundle) -> Iterator[tuple[str, Any]]:
    settings = Settings(backend="onnxrt", grpc_port=0, max_delay_ms=1,
                        end_to_end=request.param == "end-to-end")
    with serve([("shapes", detector)], settings) as r:
        yield request.param, r


def _decode(docs: dict[str, Any], outputs: dict[str, np.ndarray], i: int, size: tuple[int, int],
            bundle: Bundle) -> list[dict[str, Any]]:
    """Image ``i``'s detections decoded as docs/serve.md shows, with no letterbox left to undo."""
    place = (1.0, 1.0, 0.0, 0.0, *size)
    if "num_dets" in outputs:
        xyxy, scores, classes = docs["decode_end_to_end"](*(outputs[n][i] for n in END_TO_END), *place)
    else:
        post = bundle.manifest.detect_post()
        xyxy, scores, classes = docs["decode_raw"](outputs["boxes"][i], outputs["scores"][i], *place,
                                                   conf=post.score_threshold, iou=post.iou_threshold,
                                                   max_det=post.max_detections)
    return [{"box": list(map(float, b)), "label": bundle.manifest.classes[int(c)], "score": float(s)}
            for b, s, c in zip(xyxy, scores, classes, strict=True)]


def _same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [d["label"] for d in got] == [d["label"] for d in want]
    for a, b in zip(got, want, strict=True):
        assert np.allclose(a["box"], b["box"], atol=BOX_TOL_PX), (a, b)
        assert abs(a["score"] - b["score"]) <= 1e-5


def test_v2_encoded_images_give_v1_boxes_over_http_and_grpc(running: tuple[str, Any],
                                                            detector: Bundle) -> None:
    variant, r = running
    blobs, sizes = _photos(), [(160, 120), (90, 200)]
    docs = _docs_decoder()
    v1 = httpx.post(
        f"http://{r.http}/v1/models/shapes/predict",
        timeout=30,
        files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)],
    ).json()["predictions"]
    assert sum(len(p["boxes"]) for p in v1) > 0

    c = httpclient.InferenceServerClient(r.http)
    inp = httpclient.InferInput("images", [len(blobs)], "BYTES")
    inp.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    res = c.infer("shapes", [inp])
    names = [o["name"] for o in res.get_response()["outputs"]]
    assert names == (END_TO_END if variant == "end-to-end" else ["boxes", "scores"])
    over_http = {n: res.as_numpy(n) for n in names}
    c.close()

    g = grpcclient.InferenceServerClient(r.grpc)
    ginp = grpcclient.InferInput("images", [len(blobs)], "BYTES")
    ginp.set_data_from_numpy(np.array(blobs, dtype=np.object_))
    gres = g.infer("shapes", [ginp])
    over_grpc = {n: gres.as_numpy(n) for n in names}
    g.close()

    for i, size in enumerate(sizes):
        want = [{"box": d["box"], "label": d["label"], "score": d["score"]} for d in v1[i]["boxes"]]
        _same(_decode(docs, over_http, i, size, detector), want)
        _same(_decode(docs, over_grpc, i, size, detector), want)


def test_v2_tensor_input_keeps_letterboxed_boxes(running: tuple[str, Any], detector: Bundle) -> None:
    """A preprocessed tensor has no original image: its boxes stay in the input's pixels, as the graph
    answers."""
    import onnxruntime as ort

    variant, r = running
    graph, name = ("model.nms.onnx", "det_boxes") if variant == "end-to-end" else ("model.onnx", "boxes")
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    c = httpclient.InferenceServerClient(r.http)
    inp = httpclient.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    got = c.infer("shapes", [inp]).as_numpy(name)
    c.close()
    sess = ort.InferenceSession(str(detector.root / graph), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, sess.run([name], {"images": x})[0], atol=1e-4)


def test_metadata_lists_the_served_outputs_and_their_meaning(running: tuple[str, Any]) -> None:
    variant, r = running
    meta = httpx.get(f"http://{r.http}/v2/models/shapes", timeout=30).json()
    names = END_TO_END if variant == "end-to-end" else ["boxes", "scores"]
    assert [o["name"] for o in meta["outputs"]] == names
    params = meta["parameters"]
    assert list(params["outputs"]) == names
    assert "original image's pixels" in params["box_coordinates"]
    if variant == "end-to-end":
        assert [o["datatype"] for o in meta["outputs"]] == ["INT32", "FP32", "FP32", "INT32"]
        assert (
            params["postprocessing"].startswith("NMS done in the graph")
            and "iou_threshold=0.5" in params["postprocessing"]
        )
        assert "rows past num_dets are padding" in params["outputs"]["det_boxes"]
    else:
        assert params["postprocessing"].startswith("none")
    g = grpcclient.InferenceServerClient(r.grpc)
    over_grpc = g.get_model_metadata("shapes")
    config = g.get_model_config("shapes").config
    g.close()
    assert [o.name for o in over_grpc.outputs] == names
    assert [o.name for o in config.output] == names
    assert ("nms.iou_threshold" in config.parameters) == (variant == "end-to-end")
