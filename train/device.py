"""Where a run executes: the process group (one process, or one per GPU / CPU worker under torchrun),
the device of this process, kernel settings and seeding."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from kiln.errors import ConfigError
from kiln.train.config import TrainConfig
from kiln.train.launch import die_with_parent


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def split_batch(self, batch: int) -> int:
        """This process's share of the global batch ``batch`` (``--batch-size`` is the global batch: the
        steps per epoch, the schedule and the result do not depend on the number of processes)."""
        if batch % self.world:
            lower = max(self.world, batch - batch % self.world)
            raise ConfigError(f"--batch-size {batch} does not split evenly over {self.world} processes "
                              f"(--batch-size is the global batch): use {lower} or {lower + self.world}")
        return batch // self.world

    def sum_over_ranks(self, totals: dict[str, float], device: torch.device) -> dict[str, float]:
        """``totals`` summed over every process of the group (the same keys on every rank)."""
        if not self.enabled:
            return totals
        keys = sorted(totals)
        t = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist(), strict=True))

    def barrier(self) -> None:
        """Wait for every process of the group (rank 0 writes the bundle while the others wait)."""
        if self.enabled:
            dist.barrier()


def init_distributed(device_kind: str) -> Dist:
    die_with_parent()  # a torchrun worker never outlives its agent
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, d: Dist) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(d.local_rank)
    return torch.device("cuda", d.local_rank)


def configure_kernels(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def dist_cleanup() -> Iterator[None]:
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
