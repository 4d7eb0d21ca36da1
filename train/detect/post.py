"""Detection post-processing in torch (torchvision's batched NMS), the twin of
:func:`kiln.processing.detect_postprocess` (numpy) used in serving: both give the same detections."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms

from kiln.bundle import DetectPost
from kiln.processing import PRE_NMS_TOP_K, Letterbox


def detect_postprocess_torch(boxes: torch.Tensor, scores: torch.Tensor, letterboxes: Sequence[Letterbox] | None,
                             post: DetectPost, classes: Sequence[str]) -> list[list[dict[str, object]]]:
    """``boxes [N, A, 4]`` xyxy input pixels and ``scores [N, A, C]`` -> per image a list of
    ``{"box", "label", "index", "score"}`` with the box in original pixels (input pixels when
    ``letterboxes`` is None), best first."""
    out: list[list[dict[str, object]]] = []
    num_classes = scores.shape[-1]
    for i in range(boxes.shape[0]):
        flat = scores[i].reshape(-1)
        cand = torch.nonzero(flat > post.score_threshold).squeeze(1)
        if cand.numel() > PRE_NMS_TOP_K:
            cand = cand[torch.topk(flat[cand], PRE_NMS_TOP_K).indices]
        anchor, cls = cand // num_classes, cand % num_classes
        b, s = boxes[i][anchor].float(), flat[cand].float()
        keep = batched_nms(b, s, cls, post.iou_threshold)[: post.max_detections]
        kept = b[keep].cpu().numpy()
        if letterboxes is not None:
            kept = letterboxes[i].to_original(kept)
        dets = []
        for box, score, c in zip(kept, s[keep].tolist(), cls[keep].tolist(), strict=True):
            dets.append({"box": [float(v) for v in np.asarray(box)], "label": classes[c], "index": int(c), "score": float(score)})
        out.append(dets)
    return out
