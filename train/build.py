"""Building a run's parts from its resolved settings (:class:`kiln.train.resolve.Settings`): the model,
the data loaders and the network the loop steps through. Nothing here trains; :mod:`kiln.train.loop`
calls these once, in order, before its first epoch."""

from __future__ import annotations

import logging
from collections.abc import Sized
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kiln.data import ImageDataset
from kiln.models import build_model, load_weights, model_cost, read_state_dict
from kiln.train import finetune
from kiln.train.device import Dist
from kiln.train.resolve import Settings
from kiln.train.stats import sample_indices

log = logging.getLogger("kiln.train")


def run_model(s: Settings, device: torch.device, *, resumed: bool,
              main: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The run's model on ``device`` and its cost (parameters, GFLOPs per image).

    Initial weights are identical on every rank and on resume (seeded from the config); a new run loads
    its pretrained backbone (``--pretrained``) and ``--weights`` (a new head where the shapes differ); a
    resumed run restores its own weights afterwards."""
    cfg = s.cfg
    torch.manual_seed(cfg.seed)
    model = build_model(s.arch)
    if not resumed:
        finetune.init_pretrained(model, s.arch, cfg)
    if cfg.weights:
        fresh = finetune.fresh_head(model, cfg, list(s.classes))
        skipped = load_weights(model, read_state_dict(cfg.weights), replace_head=True,
                               ignore=fresh) + list(fresh)
        if skipped:
            log.info("--weights %s: re-initialised %d tensor(s) whose shape differs (new head): %s",
                     cfg.weights, len(skipped), ", ".join(skipped[:4]))
    cost = model_cost(model, (s.arch.args["in_channels"], *s.pre.size))
    if main:
        log.info("%s: %.2fM parameters, %.3g GFLOPs per %dx%d image", cfg.model, cost["parameters"] / 1e6,
                 cost["gflops"], *s.pre.size)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model, cost


def train_loader(s: Settings, ds: Dataset, d: Dist,
                 device: torch.device) -> tuple[DataLoader, DistributedSampler[Any] | None, torch.Generator]:
    """The training loader with its sampler (one shard per rank under DDP) and the generator that
    :func:`kiln.train.loop.seed_epoch` reseeds every epoch. Its workers persist across epochs."""
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True, seed=s.cfg.seed)
        if d.enabled else None)
    gen = torch.Generator()
    loader = DataLoader(
        ds, batch_size=d.split_batch(s.batch_size), shuffle=sampler is None, sampler=sampler,
        num_workers=s.workers, pin_memory=device.type == "cuda", collate_fn=s.task.collate, generator=gen,
        drop_last=len(cast(Sized, ds)) > s.batch_size, persistent_workers=s.workers > 0)
    return loader, sampler, gen


def val_loader(s: Settings, ds: Dataset, device: torch.device) -> DataLoader:
    return DataLoader(ds, batch_size=max(64, s.batch_size), shuffle=False, num_workers=s.workers,
                      collate_fn=s.task.collate, pin_memory=device.type == "cuda",
                      persistent_workers=s.workers > 0)


def bn_loader(s: Settings, model: nn.Module, train_raw: ImageDataset) -> DataLoader | None:
    """Training images without augmentation for precise-BN (:meth:`kiln.train.loop.Trainer._precise_bn`),
    or None when the model has no BatchNorm statistics to re-estimate or precise-BN is off."""
    cfg = s.cfg
    if not cfg.precise_bn or not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for m in model.modules()):
        return None
    # A fixed sample in a shuffled order: folder sets list their images class by class, and a batch of
    # one class has a far smaller variance than the data (its statistics would be wrong).
    idx = sample_indices(len(train_raw), cfg.precise_bn_images, cfg.seed)
    plain = train_raw.subset(np.random.default_rng(cfg.seed).permutation(idx).tolist())
    ds = s.task.torch_datasets(cfg, plain, plain, s.pre)[1]  # the val-side dataset: no augmentation
    return DataLoader(ds, batch_size=s.batch_size, shuffle=False, num_workers=0, collate_fn=s.task.collate,
                      drop_last=len(ds) > s.batch_size)


def network(model: nn.Module, s: Settings, d: Dist, device: torch.device) -> nn.Module:
    """What the loop calls forward on: ``model`` wrapped in DDP under a process group, compiled with
    ``--compile``. Weights, checkpoints and evaluation use ``model`` itself."""
    net: nn.Module = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if s.cfg.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    return net
