"""Detection post-processing in torch (torchvision's batched NMS), the twin of
:func:`kiln.processing.detect_postprocess` (numpy) used in serving: both give the same detections."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms

from kiln.bundle import DetectPost
from kiln.processing import PRE_NMS_TOP_K, Letterbox


def detect_postprocess_torch(boxes: torch.Tensor, scores: torch.Tensor,
                             letterboxes: Sequence[Letterbox] | None,
                             post: DetectPost, classes: Sequence[str]) -> list[list[dict[str, object]]]:
    """``boxes [N, A, 4]`` xyxy input pixels and ``scores [N, A, C]`` -> per image a list of
    ``{"box", "label", "index", "score"}`` with the box in original pixels (input pixels when
    ``letterboxes`` is None), best first."""
    out: list[list[dict[str, object]]] = []
    num_classes = scores.shape[-1]
    allowed = torch.as_tensor(post.classes, dtype=torch.long) if post.classes is not None else None
    for i in range(boxes.shape[0]):
        if post.multi_label:
            flat = scores[i].reshape(-1)
            cand = torch.nonzero(flat > post.score_threshold).squeeze(1)
            anchor, cls, s = cand // num_classes, cand % num_classes, flat[cand]
        else:  # one label per location: its best class
            top, best = scores[i].max(1)
            anchor = torch.nonzero(top > post.score_threshold).squeeze(1)
            cls, s = best[anchor], top[anchor]
        if allowed is not None:
            ok = torch.isin(cls, allowed.to(cls.device))
            anchor, cls, s = anchor[ok], cls[ok], s[ok]
        if s.numel() > PRE_NMS_TOP_K:
            # a stable order, as numpy's argsort(kind="stable") picks the same candidates on ties
            top_k = torch.sort(-s, stable=True).indices[:PRE_NMS_TOP_K]
            anchor, cls, s = anchor[top_k], cls[top_k], s[top_k]
        b, s = boxes[i][anchor].float(), s.float()
        groups = torch.zeros_like(cls) if post.class_agnostic else cls
        keep = batched_nms(b, s, groups, post.iou_threshold)[: post.max_detections]
        kept = b[keep].cpu().numpy()
        if letterboxes is not None:
            kept = letterboxes[i].to_original(kept)
        dets = []
        for box, score, c in zip(kept, s[keep].tolist(), cls[keep].tolist(), strict=True):
            dets.append(
                {"box": [float(v) for v in np.asarray(box)], "label": classes[c], "index": int(c),
                 "score": float(score)})
        out.append(dets)
    return out
