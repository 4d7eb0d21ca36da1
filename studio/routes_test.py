"""The Test page's validation side: the run's validation split through its bundle (the same
``kiln.evaluate`` functions ``kiln eval`` runs), its confusion matrix with the images of every cell, and
the validation images themselves, which the page can pick and send through ``/api/predict``."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response

from kiln.errors import KilnError
from kiln.studio.routes_models import bundle_backend
from kiln.studio.state import Studio, studio
from kiln.vocab import GRAPH_PRECISIONS

router = APIRouter(prefix="/api")
# A pass over the split costs one inference per image: larger splits are read up to this many images.
MAX_VAL_IMAGES = 2000
IMAGE_MAX_PX = 1024  # the side of an image the page fetches (its thumbnails ask for less)


@dataclass
class Validation:
    """One pass of a bundle over its validation split: the dataset (for the images) and what the page
    shows."""

    dataset: Any
    answer: dict[str, Any]


def _validation(s: Studio, run: str, precision: str | None) -> Validation:
    from kiln.evaluate import bundle_split, run_split, split_metrics
    from kiln.processing import softmax

    path = s.run_dir(run)
    backend, bundle = bundle_backend(s, path, precision)
    key = (str(path), precision, (path / "kiln.json").stat().st_mtime)
    with s.val_lock:  # one pass at a time: each is a whole split of inference on a shared machine
        cache = s.validations
        if key in cache:
            return cache[key]
        try:
            ds = bundle_split(bundle, "val")
        except KilnError as exc:
            raise HTTPException(409, f"{run}: {exc}") from None
        n = min(len(ds), MAX_VAL_IMAGES)
        res = run_split(bundle, backend, ds, limit=n)
        m = bundle.manifest
        answer: dict[str, Any] = {"run": run, "task": m.task, "classes": m.classes, "count": n,
                                  "split_size": len(ds),
                                  "backend": backend.name, "precision": backend.precision}
        if m.task == "classify":
            metrics = split_metrics(bundle, res, ds.subset(range(n)))
            logits = res.outputs[m.outputs[0].name]
            pred = logits.argmax(1)
            top = softmax(logits).max(1)  # as /api/predict scores its top-k
            answer["top1"] = metrics["top1"]
            answer["confusion"] = metrics["confusion"].tolist()
            answer["images"] = [{"i": i, "true": int(res.targets[i]), "pred": int(pred[i]),
                                 "score": float(top[i])}
                                for i in range(n)]
        else:
            answer["images"] = [
                {"i": i, "true_boxes": len(res.targets[i].get("labels", []))} for i in range(n)]
        for old in [k for k in cache if k[0] == key[0]]:
            cache.pop(old)
        cache[key] = Validation(ds, answer)
        return cache[key]


@router.get("/val")
def validation(request: Request, run: str = Query(...),
               precision: str | None = Query(None)) -> dict[str, Any]:
    """The run's validation split through its bundle: per image its true and predicted class and the
    predicted class's probability, and the confusion matrix ``[true][pred]`` (classification); per
    image its number of ground-truth boxes (detection)."""
    if precision is not None and precision not in GRAPH_PRECISIONS:
        raise HTTPException(400, f"precision: one of {', '.join(GRAPH_PRECISIONS)}")
    return _validation(studio(request), run, precision).answer


@router.get("/val/image")
def validation_image(request: Request, run: str = Query(...), i: int = Query(..., ge=0),
                     size: int = Query(IMAGE_MAX_PX, ge=16, le=IMAGE_MAX_PX),
                     precision: str | None = Query(None)) -> Response:
    """Validation image ``i`` as a PNG, no larger than ``size`` on its longer side."""
    if precision is not None and precision not in GRAPH_PRECISIONS:
        raise HTTPException(400, f"precision: one of {', '.join(GRAPH_PRECISIONS)}")
    val = _validation(studio(request), run, precision)
    if i >= val.answer["count"]:
        raise HTTPException(404, f"the validation split read has {val.answer['count']} images")
    img = val.dataset.image(i)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    name = Path(str(val.dataset.images[i])).name if not isinstance(val.dataset.images,
                                                                   np.ndarray) else f"val-{i}.png"
    return Response(buf.getvalue(), media_type="image/png",
                    headers={"Cache-Control": "private, max-age=3600",
                             "X-Kiln-Name": name.encode("ascii", "replace").decode()})


__all__ = ["router"]
