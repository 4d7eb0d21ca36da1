"""PyTorch backend: the bundle's ``model.pt`` run eagerly, on CUDA when present, else on the CPU.

torch is imported when a backend is created, never at import time (serving images may lack it).

Options (``load(..., backend="torch", compile=True)``):
  compile      False (default) | True | a torch.compile mode ("default", "reduce-overhead",
               "max-autotune"). The first call per batch size compiles (seconds on a CPU).
  cuda_graphs  True: replay CUDA graphs (torch.compile mode "reduce-overhead"); CUDA only.
  threads      torch.set_num_threads(threads). This is process-wide in PyTorch, not per backend.
  max_batch    largest batch accepted (default: the manifest's batch max)
Precision: fp32; fp16 or bf16 run the fp32 weights under ``torch.autocast`` (fp16 on CUDA only,
bf16 on CUDA or CPU); outputs are returned in the manifest's dtype (float32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from kiln.bundle import Artifact, Bundle
from kiln.errors import BackendUnavailable, ConfigError, KilnError, install_hint, unknown_choice
from kiln.runtime._common import Device, KilnBackend, batch_limits, installed, parse_device, spec_names

OPTIONS = frozenset({"compile", "cuda_graphs", "threads", "max_batch"})
PRECISIONS = ("fp32", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def unavailable_reason(device: Device | None = None, precision: str = "fp32") -> str | None:
    """Why this backend cannot run here, or None. Imports torch only when CUDA must be checked."""
    if not installed("torch"):
        return f"PyTorch is not installed ({install_hint('train')})"
    if precision not in PRECISIONS:
        return f"torch runs {', '.join(PRECISIONS)} (autocast), not {precision}"
    if precision == "fp16" and device is not None and device.kind == "cpu":
        return "fp16 autocast needs CUDA, but device cpu was requested"
    if (device is not None and device.kind == "cuda") or precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            what = "fp16 autocast" if precision == "fp16" else "device cuda"
            return f"{what} needs CUDA but torch.cuda.is_available() is False"
    return None


class TorchBackend(KilnBackend):
    """Runs the bundle's PyTorch model. Outputs are fresh numpy arrays owned by the caller."""

    name = "torch"

    def __init__(
        self,
        bundle: Bundle,
        *,
        file: str = "model.pt",
        precision: str = "fp32",
        device: str | None = None,
        max_batch: int | None = None,
        compile: bool | str = False,
        cuda_graphs: bool = False,
        threads: int | None = None,
    ) -> None:
        super().__init__()
        want = parse_device(device)
        if (why := unavailable_reason(want, precision)) is not None:
            raise BackendUnavailable(f"torch: {why}")
        # the registry imports torch, which serving images may lack: only here, with torch itself
        import torch

        from kiln.models import load_model

        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ConfigError(f"torch threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        use_cuda = torch.cuda.is_available() if want is None else want.kind == "cuda"
        self._device = torch.device(f"cuda:{want.index if want else 0}" if use_cuda else "cpu")
        self.device = str(self._device)

        mode: str | None = None
        if cuda_graphs:
            if not use_cuda:
                raise BackendUnavailable("torch: cuda_graphs needs CUDA; this backend runs on the CPU")
            mode = "reduce-overhead"
        elif compile is True:
            mode = "default"
        elif isinstance(compile, str):
            if compile not in COMPILE_MODES:
                raise unknown_choice("mode", compile, COMPILE_MODES, flag="torch compile")
            mode = compile

        model = load_model(bundle, file=file).to(self._device)
        self._model: Any = torch.compile(model, mode=mode) if mode is not None else model
        self.compile_mode = mode
        m = bundle.manifest
        self.inputs = [m.input]
        self.outputs = list(m.outputs)
        self._output_names = spec_names(self.outputs)
        self.min_batch, self.max_batch = batch_limits(m.input.batch, max_batch)
        self.precision = precision
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.artifact = file

    @classmethod
    def from_artifact(
        cls, bundle: Bundle, art: Artifact, *, device: str | None = None, precision: str | None = None,
        **opts: Any
    ) -> TorchBackend:
        bundle.verify_artifact(art)
        return cls(bundle, file=art.file, precision=precision or art.precision, device=device, **opts)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(feeds[self.inputs[0].name])).to(
            self._device, non_blocking=True)
        autocast = (
            torch.autocast(self._device.type, dtype=self._autocast_dtype)
            if self._autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            result = self._model(x)
        tensors = self._as_list(result)
        out: dict[str, np.ndarray] = {}
        for spec, t in zip(self.outputs, tensors, strict=True):
            # .cpu() copies from a GPU (and CUDA-graph outputs are overwritten by the next replay, so
            # that copy is needed); on the CPU an eager forward returns new tensors every call.
            arr = t.detach().to(dtype=_torch_dtype(spec.dtype)).cpu().numpy()
            out[spec.name] = arr if self._device.type != "cpu" or self.compile_mode is None else arr.copy()
        return out

    def _as_list(self, result: Any) -> list[Any]:
        if isinstance(result, Mapping):
            missing = [n for n in self._output_names if n not in result]
            if missing:
                raise KilnError(
                    f"torch model returned keys {sorted(result)}, kiln.json expects outputs "
                    f"{self._output_names}")
            return [result[n] for n in self._output_names]
        tensors = list(result) if isinstance(result, tuple | list) else [result]
        if len(tensors) != len(self._output_names):
            raise KilnError(
                f"torch model returned {len(tensors)} outputs, kiln.json expects {len(self._output_names)} "
                f"({self._output_names}); is the model in eval mode and matching the manifest?"
            )
        return tensors

    def _close(self) -> None:
        self._model = None


def _torch_dtype(name: str) -> Any:
    import torch

    try:
        return getattr(torch, np.dtype(name).name)
    except (AttributeError, TypeError) as exc:
        raise KilnError(f"unsupported output dtype {name}") from exc
