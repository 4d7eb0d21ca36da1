"""Test doubles for TensorRT, cuda-python and pycuda, written from the bindings' documented behaviour
so kiln's real adapters (``kiln.runtime.cuda._CudaPython`` / ``_PyCuda``) and its TensorRT code run
against them without a GPU.

- :class:`FakeDevice` is the GPU: device memory, streams whose work runs only when synchronized,
  and a record of every device/pinned free made while queued work still used that memory.
- :func:`make_cudart` is ``cuda.bindings.runtime``: calls return ``(cudaError_t, *values)``.
- :func:`make_pycuda` is ``pycuda.driver`` with a context stack per thread.
- :func:`make_tensorrt` is the ``tensorrt`` module of one major version (10 or 11): the enums and
  flags that version has, ``nptype`` raising for types numpy lacks, a builder/parser/config that
  record and validate calls, and a runtime that deserializes the plans that builder writes.
"""

from .cudart import make_cuda_utils, make_cudart
from .device import FakeDevice
from .env import FakeEnv, install
from .pycuda import make_pycuda
from .tensorrt import make_graph, make_plan, make_tensorrt

__all__ = ["FakeDevice", "FakeEnv", "install", "make_cuda_utils", "make_cudart", "make_graph", "make_plan",
           "make_pycuda", "make_tensorrt"]
