"""The training and validation loaders of a process (each knows its rank): the data package's loaders over
the split, or over its latent cache, in the resumable order of `vis2ir.data.order`."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from vis2ir.config import Config
from vis2ir.data.order import Positioned, StepSampler
from vis2ir.errors import Vis2IRError
from vis2ir.semantic.modes import NEEDS_SEMANTIC

log = logging.getLogger(__name__)


def split_loader(cfg: Config, trainer: L.Trainer, split: str, start_step: int = 0, data: dict | None = None
                 ) -> DataLoader | list:
    """The train loader (endless, resumable order), or the validation loader ([] when empty); both are
    the data package's `make_loader`. `data`: the training split's `data_fingerprint` as this launch computed it
    (a latent cache is then checked against its source without listing the source again)."""
    from vis2ir.data import build_dataset, make_loader

    need = cfg.model.semantic.mode in NEEDS_SEMANTIC
    kw = dict(batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    if split == "val":
        val_set = build_dataset(cfg.data, "val", require_semantic=need, empty_ok=True)
        if not len(val_set):
            log.warning("%s: the validation split is empty (data.val_fraction=%g of a small data set); training goes "
                        "on without validation (a larger data.val_fraction, or more samples, gives one)",
                        cfg.data.source, cfg.data.val_fraction)
            return []
        return make_loader(val_set, shuffle=False, **kw)
    if cfg.data.latent_cache:
        from vis2ir.latent_cache import LatentCache

        train_set = LatentCache(cfg.data.latent_cache, cfg, source=data)
    else:
        train_set = build_dataset(cfg.data, "train", require_semantic=need)
        if cfg.data.source == "thermalscenes" and cfg.data.synth_prerender:
            log.info("Rendering %d training scenes once, in %d processes", len(train_set),
                     max(1, cfg.data.num_workers))
            train_set.prerender(max(1, cfg.data.num_workers))
    if cfg.train.batch_size * trainer.world_size > len(train_set):
        devices = f" × {trainer.world_size} devices" if trainer.world_size > 1 else ""
        raise Vis2IRError(f"train.batch_size={cfg.train.batch_size}{devices} is larger than the training split of "
                          f"{cfg.data.source} ({len(train_set)} samples): a batch would repeat samples; set "
                          f"train.batch_size to at most {len(train_set) // trainer.world_size}, or add samples")
    per_step = cfg.train.batch_size * cfg.train.accumulate_grad_batches
    sampler = StepSampler(start=start_step * per_step, rank=trainer.global_rank, world=trainer.world_size)
    return make_loader(Positioned(train_set, cfg.train.seed, chunk=cfg.train.batch_size * trainer.world_size),
                       sampler=sampler, drop_last=True, **kw)
