"""torch2onnx: a bundle's ``model.pt`` to one self-contained ONNX file with a dynamic batch axis."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from kiln.bundle import BatchRange, Bundle
from kiln.errors import ExportError

log = logging.getLogger(__name__)

# The dynamo exporter's default opset in torch 2.14 (FACTS.md); recorded so kiln.json names it.
DEFAULT_OPSET = 20


def torch2onnx(
    bundle: Bundle,
    out_path: str | os.PathLike[str],
    *,
    batch: BatchRange,
    opset: int | None = None,
    simplify: bool = True,
) -> dict[str, Any]:
    """Export ``bundle``'s PyTorch model to ``out_path`` and return what was done (opset, simplified).

    Weights are stored inside the file (``external_data=False``) so the artifact is one file with one
    sha256. The batch axis is dynamic over ``batch.min..batch.max``; names come from kiln.json.
    Raises :class:`ExportError` naming the node and operator when an operator has no ONNX translation.
    """
    import onnx
    import torch

    from kiln.models import load_model  # imports torch

    model = load_model(bundle)
    man = bundle.manifest
    example = torch.zeros((max(2, batch.opt), *man.input.shape), dtype=torch.float32)
    # The exporter specializes a dimension whose example size is 0 or 1, so the example batch is >= 2.
    dim = torch.export.Dim("batch", min=batch.min, max=max(batch.max, 2))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    chatter = io.StringIO()
    try:
        # The exporter prints progress on stdout, which `kiln export --json` keeps for its summary.
        with contextlib.redirect_stdout(chatter), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(out),
                input_names=[man.input.name],
                output_names=[o.name for o in man.outputs],
                dynamic_shapes=({0: dim},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:
        log.debug("exporter output:\n%s", chatter.getvalue())
        raise ExportError(f"torch2onnx: {man.architecture.name}: {describe_export_error(exc)}") from exc
    log.debug("exporter output:\n%s", chatter.getvalue())

    simplified = False
    if simplify:
        simplified = _simplify(out)
    proto = onnx.load(str(out))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"torch2onnx: the exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    used_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    return {"opset": used_opset, "simplified": simplified,
            "exporter": f"torch.onnx dynamo (torch {torch.__version__})"}


def _simplify(path: Path) -> bool:
    """Run onnxslim in place; a failure keeps the unsimplified graph (it is correct, only larger)."""
    try:
        import onnxslim
    except ModuleNotFoundError:
        log.warning("onnxslim is not installed; skipping graph simplification (pip install onnxslim)")
        return False
    try:
        with contextlib.redirect_stdout(sys.stderr):
            slim = onnxslim.slim(str(path))
        import onnx

        onnx.save(slim, str(path))
    except Exception as exc:  # onnxslim raises assorted types on graphs it cannot fold
        log.warning("onnxslim failed (%s: %s); keeping the unsimplified graph", type(exc).__name__, exc)
        return False
    return True


_NODE = re.compile(r"(?:translating node|While executing) %(\S+)")
_TARGET = re.compile(r"target=(?:torch\.ops\.)?([\w.]+)")
_OVERLOAD = re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)")
_NO_TRANSLATION = ("No ONNX function found", "No decompositions registered", "is not supported")


def describe_export_error(exc: BaseException) -> str:
    """One line from the exporter's long report, naming the node and operator where it can."""
    text = "\n".join(str(e) for e in _chain(exc))
    node = _NODE.search(text)
    overload = _OVERLOAD.search(text)
    target = _TARGET.search(text)
    op_name = f"{overload.group(1)}.{overload.group(2)}" if overload else target.group(1) if target else None
    where = f"node '{node.group(1)}' " if node else ""
    if op_name and any(marker in text for marker in _NO_TRANSLATION):
        return (f"unsupported operator: {where}calls '{op_name}', which has no ONNX translation in this "
                f"torch.onnx version (replace the op, or register an ONNX function for it)")
    summary = text.split("## Exception summary", 1)[-1].strip()
    first = next((ln.strip() for ln in summary.splitlines() if ln.strip() and not ln.startswith("⬆")),
                 type(exc).__name__)
    if op_name:
        return f"the exporter failed at {where}('{op_name}'): {first}"
    return f"the exporter failed: {first}"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen
