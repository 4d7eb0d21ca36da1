"""onnx2nms: a detector's raw ONNX graph to an end-to-end graph with NMS inside.

The raw graph answers ``boxes [N, A, 4]`` (x1, y1, x2, y2 in the letterboxed input's pixels) and
``scores [N, A, C]`` (per-class scores in [0, 1]) before any filtering. The end-to-end graph appends
what :func:`kiln.processing.detect_postprocess` does, with ONNX operators, and answers EfficientNMS-style
outputs (what TensorRT's EfficientNMS plugin and Triton detector repositories use):

    num_dets     int32   [N, 1]     detections per image
    det_boxes    float32 [N, K, 4]  x1, y1, x2, y2 in the letterboxed input's pixels, best first
    det_scores   float32 [N, K]     rows past num_dets are 0
    det_classes  int32   [N, K]     class index; rows past num_dets are 0

Per image: each anchor's best class and score (ArgMax), the best :data:`~kiln.processing.PRE_NMS_TOP_K`
anchors (TopK), ONNX ``NonMaxSuppression`` per class (or across classes when agnostic) with the score
and IoU thresholds, then the best ``K`` survivors (TopK) padded to ``K``. ``NonMaxSuppression`` keeps a box
scoring above the score threshold and drops one whose IoU with a better kept box is above the IoU
threshold, the rules of kiln's own NMS. The settings are recorded in the graph's ``metadata_props``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.bundle import DetectPost, Manifest
from kiln.compare import detection_output_names
from kiln.errors import ExportError
from kiln.export.verify import backend_outputs
from kiln.outputs import end_to_end_detections
from kiln.processing import PRE_NMS_TOP_K, Letterbox, detect_postprocess
from kiln.runtime.base import Backend

MIN_OPSET = 13  # ReduceSum and Unsqueeze take their axes as inputs from opset 13
OUTPUTS = ("num_dets", "det_boxes", "det_scores", "det_classes")


@dataclass(frozen=True)
class NmsSettings:
    """What the end-to-end graph bakes in: thresholds, detections per image ``K``, class-aware or not."""

    score_threshold: float = 0.25
    iou_threshold: float = 0.5
    max_detections: int = 100
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        for flag, value in (("--nms-conf", self.score_threshold), ("--nms-iou", self.iou_threshold)):
            if not 0.0 <= value <= 1.0:
                raise ExportError(f"{flag}: must be in [0, 1], got {value}")
        if self.max_detections < 1:
            raise ExportError(f"--nms-max-det: must be >= 1, got {self.max_detections}")

    @classmethod
    def from_post(cls, post: DetectPost, **changes: Any) -> NmsSettings:
        """kiln.json's post-processing defaults with ``changes`` (``None`` values keep the default)."""
        base = {"score_threshold": post.score_threshold, "iou_threshold": post.iou_threshold,
                "max_detections": post.max_detections, "class_agnostic": post.class_agnostic}
        return cls(**{**base, **{k: v for k, v in changes.items() if v is not None}})

    def metadata(self) -> dict[str, str]:
        """The graph's ``metadata_props`` (strings, as ONNX stores them)."""
        return {
            "kiln.nms." + k: str(v).lower() if isinstance(v,
                                                          bool) else str(v) for k, v in asdict(self).items()}

    def record(self) -> dict[str, Any]:
        """What kiln.json records under the artifact's ``nms``."""
        return {**asdict(self), "pre_nms_top_k": PRE_NMS_TOP_K, "multi_label": False, "box_format": "xyxy",
                "coordinates": "letterboxed input pixels"}


def output_specs(max_detections: int) -> list[dict[str, Any]]:
    """The end-to-end outputs as kiln.json's TensorSpec dicts (shapes without the batch axis)."""
    k = max_detections
    return [{"name": "num_dets", "shape": [1], "dtype": "int32"},
            {"name": "det_boxes", "shape": [k, 4], "dtype": "float32"},
            {"name": "det_scores", "shape": [k], "dtype": "float32"},
            {"name": "det_classes", "shape": [k], "dtype": "int32"}]


def onnx2nms(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, boxes: str, scores: str,
             settings: NmsSettings) -> dict[str, Any]:
    """Write ``dst``: the graph at ``src`` with its ``boxes``/``scores`` outputs decoded by NMS inside.

    ``src`` must answer ``boxes [N, A, 4]`` and ``scores [N, A, C]`` with static ``A`` and ``C``.
    Returns what kiln.json records (the NMS settings, the outputs, the opset). Raises
    :class:`ExportError` for a graph that is not such a detector or whose opset is below 13.
    """
    import onnx
    from onnx import TensorProto, compose, helper

    raw = onnx.load(os.fspath(src))
    opset, anchors, num_classes = _detector_shape(raw, boxes, scores)
    pre = min(PRE_NMS_TOP_K, anchors)  # candidates per image before NMS, as kiln's post-processing keeps
    k = settings.max_detections
    nodes = _candidate_nodes(boxes, scores, settings, pre, num_classes) + _selection_nodes(k, min(k, pre))
    graph = helper.make_graph(
        nodes, "kiln_nms",
        [helper.make_tensor_value_info(boxes, TensorProto.FLOAT, ["N", anchors, 4]),
         helper.make_tensor_value_info(scores, TensorProto.FLOAT, ["N", anchors, num_classes])],
        [helper.make_tensor_value_info("num_dets", TensorProto.INT32, ["N", 1]),
         helper.make_tensor_value_info("det_boxes", TensorProto.FLOAT, ["N", k, 4]),
         helper.make_tensor_value_info("det_scores", TensorProto.FLOAT, ["N", k]),
         helper.make_tensor_value_info("det_classes", TensorProto.INT32, ["N", k])],
    )
    post = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=raw.ir_version)
    # The raw graph's own outputs become internal; the batch axis keeps the raw graph's name for it.
    merged = compose.merge_models(raw, post, io_map=[(boxes, boxes), (scores, scores)],
                                  outputs=list(OUTPUTS), producer_name=raw.producer_name,
                                  producer_version=raw.producer_version)
    batch_dim = raw.graph.input[0].type.tensor_type.shape.dim[0]
    for out in merged.graph.output:
        out.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    onnx.helper.set_model_props(merged,
                                {**{p.key: p.value for p in raw.metadata_props}, **settings.metadata()})
    try:
        onnx.checker.check_model(merged, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"--nms: the NMS graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(merged, os.fspath(dst))
    return {"nms": settings.record(), "outputs": output_specs(k), "opset": opset, "anchors": anchors}


def _detector_shape(raw: Any, boxes: str, scores: str) -> tuple[int, int, int]:
    """``(opset, anchors A, classes C)`` of a raw detector graph answering ``boxes [N, A, 4]`` and
    ``scores [N, A, C]``; ExportError for any other graph or an opset below :data:`MIN_OPSET`."""
    opset = next((o.version for o in raw.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportError(f"--nms: the graph's opset is {opset}; the NMS graph needs opset >= {MIN_OPSET} "
                          f"(re-export with --opset {MIN_OPSET} or later)")
    shapes = {o.name: [d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim]
              for o in raw.graph.output}
    if boxes not in shapes or scores not in shapes:
        raise ExportError(
            f"--nms: the graph has outputs {sorted(shapes)}, not the detector's {boxes!r} and {scores!r}")
    b_shape, s_shape = shapes[boxes], shapes[scores]
    if (len(b_shape) != 3 or b_shape[2] != 4 or len(s_shape) != 3 or None in s_shape[1:]
            or b_shape[1] != s_shape[1]):
        raise ExportError(f"--nms: expected {boxes} [N, A, 4] and {scores} [N, A, C] with fixed A and C, "
                          f"got {b_shape} and {s_shape}")
    return opset, int(s_shape[1] or 0), int(s_shape[2] or 0)


def _const(name: str, value: Any, dtype: Any) -> Any:
    import onnx

    return onnx.helper.make_node("Constant", [], [name],
                                 value=onnx.numpy_helper.from_array(np.asarray(value, dtype), name))


def _candidate_nodes(boxes: str, scores: str, settings: NmsSettings, pre: int, num_classes: int) -> list[Any]:
    """Each anchor's best class and score, the best ``pre`` anchors as candidates (``nms/cand_boxes``,
    ``nms/cand_score``, ``nms/cand_cls``), and the scores NMS suppresses by (``nms/nms_scores``)."""
    from onnx import helper

    const, n = _const, helper.make_node
    nodes = [
        const("nms/axis2", [2], np.int64), const("nms/axis1", [1], np.int64),
        const("nms/pre", [pre], np.int64),
        const("nms/max_per_class", [settings.max_detections], np.int64),
        const("nms/iou", [settings.iou_threshold], np.float32),
        const("nms/score_thr", [settings.score_threshold], np.float32),
        const("nms/minus_one", -1.0, np.float32), const("nms/zero_f", 0.0, np.float32),
        const("nms/zero_i", 0, np.int32),
        const("nms/col_batch", [0], np.int64), const("nms/end3", [3], np.int64),
        const("nms/col_batch_box", [0, 2], np.int64),
        # each anchor's best class and its score: [N, A, 1]
        n("ArgMax", [scores], ["nms/cls_a1"], axis=2, keepdims=1),
        n("GatherElements", [scores, "nms/cls_a1"], ["nms/best_a1"], axis=2),
        n("Squeeze", ["nms/best_a1", "nms/axis2"], ["nms/best"]),  # [N, A]
        # the best `pre` anchors, best first (ties: the lower anchor first, as a stable sort gives)
        n("TopK", ["nms/best", "nms/pre"], ["nms/cand_score", "nms/cand_idx"], axis=1, largest=1, sorted=1),
        n("Unsqueeze", ["nms/cand_idx", "nms/axis2"], ["nms/cand_idx3"]),  # [N, P, 1]
        n("Shape", [boxes], ["nms/boxes_shape"]),
        n("Shape", ["nms/cand_idx3"], ["nms/idx_shape"]),
        n("Slice", ["nms/boxes_shape", "nms/axis2", "nms/end3"], ["nms/four"]),
        n("Slice", ["nms/idx_shape", "nms/col_batch", "nms/axis2"], ["nms/n_p"]),
        n("Concat", ["nms/n_p", "nms/four"], ["nms/n_p_4"], axis=0),
        n("Expand", ["nms/cand_idx3", "nms/n_p_4"], ["nms/cand_idx4"]),
        n("GatherElements", [boxes, "nms/cand_idx4"], ["nms/cand_boxes"], axis=1),  # [N, P, 4]
        n("GatherElements", ["nms/cls_a1", "nms/cand_idx3"], ["nms/cand_cls3"], axis=1),  # [N, P, 1]
        n("Squeeze", ["nms/cand_cls3", "nms/axis2"], ["nms/cand_cls"]),  # [N, P] int64
    ]
    if settings.class_agnostic:
        nodes.append(n("Unsqueeze", ["nms/cand_score", "nms/axis1"], ["nms/nms_scores"]))  # [N, 1, P]
    else:
        # [N, C, P]: a candidate scores only for its best class, so it is suppressed only by its own class
        nodes += [
            const("nms/depth", [num_classes], np.int64), const("nms/off_on", [0.0, 1.0], np.float32),
            n("OneHot", ["nms/cand_cls", "nms/depth", "nms/off_on"], ["nms/onehot"], axis=1),  # [N, C, P]
            n("Unsqueeze", ["nms/cand_score", "nms/axis1"], ["nms/cand_score3"]),
            n("Mul", ["nms/onehot", "nms/cand_score3"], ["nms/nms_scores"]),
        ]
    return nodes


def _selection_nodes(k: int, kept: int) -> list[Any]:
    """NMS over the candidates, then the best ``kept`` per image as ``num_dets``, ``det_boxes``,
    ``det_scores``, ``det_classes``, zero-padded to ``k`` rows when fewer candidates than ``k`` exist."""
    from onnx import TensorProto, helper

    const, n = _const, helper.make_node
    nodes = [const("nms/kept", [kept], np.int64)]
    nodes += [
        n("NonMaxSuppression",
          ["nms/cand_boxes", "nms/nms_scores", "nms/max_per_class", "nms/iou", "nms/score_thr"],
          ["nms/selected"], center_point_box=0),  # [S, 3]: batch, class, candidate
        # a dense [N, P] score of the kept candidates, -1 elsewhere, to take the best K per image
        n("Gather", ["nms/selected", "nms/col_batch_box"], ["nms/sel_bp"], axis=1),  # [S, 2]
        n("GatherND", ["nms/cand_score", "nms/sel_bp"], ["nms/sel_score"]),  # [S]
        n("Shape", ["nms/cand_score"], ["nms/n_p_shape"]),
        n("ConstantOfShape", ["nms/n_p_shape"], ["nms/dense0"],
          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-1.0])),
        n("ScatterND", ["nms/dense0", "nms/sel_bp", "nms/sel_score"], ["nms/dense"]),
        n("TopK", ["nms/dense", "nms/kept"], ["nms/top_score", "nms/top_idx"], axis=1, largest=1, sorted=1),
        n("Greater", ["nms/top_score", "nms/minus_one"], ["nms/valid"]),  # [N, k]
        n("Cast", ["nms/valid"], ["nms/valid_i"], to=TensorProto.INT32),
        n("ReduceSum", ["nms/valid_i", "nms/axis1"], ["num_dets"], keepdims=1),  # [N, 1]
        n("Where", ["nms/valid", "nms/top_score", "nms/zero_f"], ["nms/det_scores_k"]),
        n("GatherElements", ["nms/cand_cls", "nms/top_idx"], ["nms/top_cls"], axis=1),
        n("Cast", ["nms/top_cls"], ["nms/top_cls_i"], to=TensorProto.INT32),
        n("Where", ["nms/valid", "nms/top_cls_i", "nms/zero_i"], ["nms/det_classes_k"]),
        n("Unsqueeze", ["nms/top_idx", "nms/axis2"], ["nms/top_idx3"]),
        n("Shape", ["nms/top_idx3"], ["nms/top_shape"]),
        n("Slice", ["nms/top_shape", "nms/col_batch", "nms/axis2"], ["nms/n_k"]),
        n("Concat", ["nms/n_k", "nms/four"], ["nms/n_k_4"], axis=0),
        n("Expand", ["nms/top_idx3", "nms/n_k_4"], ["nms/top_idx4"]),
        n("GatherElements", ["nms/cand_boxes", "nms/top_idx4"], ["nms/top_boxes"], axis=1),
        n("Unsqueeze", ["nms/valid", "nms/axis2"], ["nms/valid3"]),
        n("Where", ["nms/valid3", "nms/top_boxes", "nms/zero_f"], ["nms/det_boxes_k"]),
    ]
    pad = k - kept
    names = {"det_boxes": "nms/det_boxes_k", "det_scores": "nms/det_scores_k",
             "det_classes": "nms/det_classes_k"}
    if pad:  # fewer candidates than K: zero rows up to K, so every batch answers [N, K, ...]
        for out, rank in (("det_boxes", 3), ("det_scores", 2), ("det_classes", 2)):
            pads = [0, 0, 0][:rank] + [0, pad, 0][:rank]
            nodes += [const(f"nms/pads_{out}", pads, np.int64),
                      n("Pad", [names[out], f"nms/pads_{out}"], [out])]
    else:
        nodes += [n("Identity", [names[out]], [out]) for out in names]
    return nodes




# The end-to-end graph gathers the raw graph's own numbers: it must reproduce kiln's post-processing of
# them to float rounding (boxes in original pixels, scores), with the same count and classes per image.
BOX_TOL_PX = 1e-3
SCORE_TOL = 1e-6


def verify_end_to_end(manifest: Manifest, raw: Backend, end_to_end: Backend, x: np.ndarray,
                      letterboxes: list[Letterbox], settings: NmsSettings) -> dict[str, Any]:
    """Compare ``end_to_end``'s detections on ``x`` with :func:`kiln.processing.detect_postprocess` of
    ``raw``'s outputs under ``settings``; raises :class:`ExportError` on any difference."""
    post = DetectPost(score_threshold=settings.score_threshold, iou_threshold=settings.iou_threshold,
                      max_detections=settings.max_detections, class_agnostic=settings.class_agnostic)
    boxes, scores = detection_output_names(manifest)
    ref_out = backend_outputs(raw, x)
    ref = detect_postprocess(ref_out[boxes], ref_out[scores], letterboxes, post, manifest.classes)
    got = end_to_end_detections(backend_outputs(end_to_end, x), letterboxes, manifest.classes)
    box_diff = score_diff = 0.0
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        if len(r) != len(g) or [d["index"] for d in r] != [d["index"] for d in g]:
            raise ExportError(f"--nms verification failed on validation image {i}: {len(g)} detections "
                              f"(classes {[d['index'] for d in g]}) where kiln's post-processing gives "
                              f"{len(r)} ({[d['index'] for d in r]})")
        for a, b in zip(r, g, strict=True):
            box_diff = max(box_diff,
                           float(np.abs(np.subtract(np.asarray(a["box"]), np.asarray(b["box"]))).max()))
            score_diff = max(score_diff, float(np.abs(np.asarray(a["score"]) - np.asarray(b["score"]))))
    report = {"reference": "kiln post-processing of the raw graph's outputs (onnxruntime cpu)",
              "images": len(x), "detections": sum(len(r) for r in ref), "max_box_diff_px": box_diff,
              "max_score_diff": score_diff, "box_tol_px": BOX_TOL_PX, "score_tol": SCORE_TOL}
    if box_diff > BOX_TOL_PX or score_diff > SCORE_TOL:
        raise ExportError(f"--nms verification failed: boxes differ by up to {box_diff:.3g} px (tolerance "
                          f"{BOX_TOL_PX}), scores by {score_diff:.3g} (tolerance {SCORE_TOL})")
    return {**report, "passed": True}


__all__ = ["MIN_OPSET", "OUTPUTS", "NmsSettings", "onnx2nms", "output_specs", "verify_end_to_end"]
