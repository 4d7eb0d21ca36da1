"""Datasets: browse the allowed folders, add a dataset in any ``--data`` form, inspect it through
``kiln.data.inspect`` (the implementation behind ``kiln data inspect``), and its images as thumbnails."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response

from kiln.data import IMG_EXTENSIONS, OPENERS, DataSpec
from kiln.errors import KilnError
from kiln.studio.paths import PathRefused, confine
from kiln.studio.state import studio

router = APIRouter(prefix="/api")
THUMB_PX = 96
MAX_LISTED = 500


@router.get("/info")
def info(request: Request) -> dict[str, Any]:
    s = studio(request)
    try:
        import torch  # noqa: F401

        training = None
    except ModuleNotFoundError:
        training = "training needs the 'train' extra: pip install 'kiln-vision[train]'"
    return {"workspace": str(s.cfg.workspace), "roots": [str(r) for r in s.cfg.roots],
            "data_forms": {name: o.usage for name, o in OPENERS.items()}, "training_missing": training}


@router.get("/fs")
def browse(request: Request, path: str = Query("")) -> dict[str, Any]:
    """Folders and image/annotation files in ``path`` (under the allowed roots); no path: the roots."""
    s = studio(request)
    if not path:
        return {"path": "", "entries": [{"name": str(r), "path": str(r), "dir": True} for r in s.cfg.roots]}
    folder = _confined(path, s.cfg.roots)
    if not folder.is_dir():
        raise HTTPException(404, f"{path}: not a folder")
    entries = []
    for p in sorted(folder.iterdir())[:MAX_LISTED]:
        if p.name.startswith("."):
            continue
        if p.is_dir() or p.suffix.lower() in (*IMG_EXTENSIONS, ".json", ".yaml", ".yml"):
            entries.append({"name": p.name, "path": str(p), "dir": p.is_dir()})
    return {"path": str(folder), "parent": str(folder.parent) if folder not in s.cfg.roots else "",
            "entries": entries}


@router.get("/datasets")
def list_datasets(request: Request) -> list[dict[str, Any]]:
    return studio(request).datasets()


@router.post("/datasets", status_code=201)
def add_dataset(request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Add ``{"spec": "folder:/data/photos"}``: each path in the spec must lie under the allowed roots."""
    s = studio(request)
    text = str(body.get("spec", "")).strip()
    try:
        spec = DataSpec.parse(text)
    except KilnError as exc:
        raise HTTPException(400, str(exc)) from None
    args = tuple(str(_confined(a, s.cfg.roots)) for a in spec.args)
    for a in args:
        if not Path(a).exists():
            raise HTTPException(404, f"{a}: no such file or folder")
    canonical = str(DataSpec(spec.name, args))
    items = [d for d in s.datasets() if d["spec"] != canonical]
    item = {"spec": canonical, "name": str(body.get("name") or canonical), "task": OPENERS[spec.name].task}
    s.save_datasets([*items, item])
    return item


@router.delete("/datasets")
def remove_dataset(request: Request, spec: str = Query(...)) -> dict[str, Any]:
    s = studio(request)
    items = s.datasets()
    if not any(d["spec"] == spec for d in items):
        raise HTTPException(404, f"no dataset {spec!r}")
    s.save_datasets([d for d in items if d["spec"] != spec])
    return {"removed": spec}


@router.get("/datasets/inspect")
def inspect_dataset(request: Request, spec: str = Query(...)) -> dict[str, Any]:
    """``kiln data inspect``'s summary: counts per class and split, image sizes, skipped files, warnings."""
    s = studio(request)
    _known(s, spec)
    from kiln.data.inspect import inspect_dataset as inspect

    return inspect(spec).to_dict()


@router.get("/datasets/sheet")
def contact_sheet(request: Request, spec: str = Query(...),
                  split: str = Query("train", pattern="^(train|val)$"),
                  per_class: int = Query(8, ge=1, le=32)) -> FileResponse:
    """The contact sheet ``kiln data inspect`` writes: one row of thumbnails per class (boxes drawn for
    detection), made once per dataset and split and kept in the studio's state folder."""
    s = studio(request)
    _known(s, spec)
    from kiln.data.inspect import write_contact_sheet

    stamps = [Path(a).stat().st_mtime for a in DataSpec.parse(spec).args if Path(a).exists()]
    key = hashlib.sha256(f"{spec}|{split}|{per_class}|{stamps}".encode()).hexdigest()[:16]
    path = s.cfg.state_dir / "sheets" / f"{key}.png"
    if not path.is_file():
        write_contact_sheet(spec, path, per_class=per_class, split=split)
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})


def _known(s: Any, spec: str) -> None:
    """Only datasets added through the studio (their paths were checked against the roots then)."""
    if not any(d["spec"] == spec for d in s.datasets()):
        raise HTTPException(404, f"no dataset {spec!r}: add it first")


@router.get("/thumb")
def thumbnail(request: Request, path: str = Query(...),
              size: int = Query(THUMB_PX, ge=16, le=512)) -> Response:
    """A JPEG thumbnail of an image file under the allowed roots."""
    s = studio(request)
    file = _confined(path, s.cfg.roots)
    if file.suffix.lower() not in IMG_EXTENSIONS or not file.is_file():
        raise HTTPException(404, f"{path}: not an image file")
    from kiln import processing

    try:
        img = processing.load_image(file, s.cfg.max_image_pixels).convert("RGB")
    except (OSError, KilnError) as exc:
        raise HTTPException(422, f"{path}: {exc}") from None
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return Response(buf.getvalue(), media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=300"})


def _confined(path: str, roots: tuple[Path, ...]) -> Path:
    try:
        return confine(path, roots)
    except PathRefused as exc:
        raise HTTPException(403, str(exc)) from None
