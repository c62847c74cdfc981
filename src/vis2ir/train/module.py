"""The Lightning module: what one training step does (docs/design.md §1, §3), validation, and the hooks by
which Lightning reaches the optimizer (`optimizer.py`), the bad-step guard (`guard.py`) and the resume state.

    t ~ sigmoid(N(mean, std)) (optionally shifted);  x_1 ~ N(0, I) (+ offset noise)      (`vis2ir.objective`)
    v̂ = model(x_t = (1 − t)·x_0 + t·x_1);  loss = mse(v̂, x_1 − x_0) over all or target tokens

A step is one (accumulated) batch; every rank's noise and RNG are a function of the seed, the rank and the
micro-batch position (`seed_step`), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from vis2ir.checkpoint import build_with_weights, find_checkpoint, merge_lora
from vis2ir.config import Config
from vis2ir.model import Encoded, Vis2IRModel, build_model
from vis2ir.objective import fixed_draw_loss, flow_loss, offset_group, sample_noise, sample_timesteps
from vis2ir.semantic.modes import drop_maps
from vis2ir.sharding import (ShardedStrategy, average_replicated_grads, clip_grads, is_sharded, local, shard_model,
                             total_norm)
from vis2ir.train.guard import BadStepGuard
from vis2ir.train.loaders import split_loader
from vis2ir.train.optimizer import MasterWeights, build_optimizer, param_groups
from vis2ir.train.prepare import prepare_for_training
from vis2ir.train.progress import samples_picture

log = logging.getLogger(__name__)


class Vis2IRModule(L.LightningModule):
    """Owns a `Vis2IRModel`, its trainable parameters and their optimizer."""

    def __init__(self, cfg: Config, model: Vis2IRModel | None = None, start_step: int = 0, source=None,
                 data: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.source = source  # the checkpoint to build from (a resume's), instead of looking up train.init_from
        self.data = data  # the training split's fingerprint, computed by `train` at launch (`split_loader`)
        self.start_step = start_step
        self.strict_loading = False  # resume states hold only the trainable weights
        self.guard = BadStepGuard(cfg.train.max_bad_steps, cfg.train.output_dir)
        self.masters = MasterWeights()  # bf16-true only
        self._step_started = None
        self._first_step = True
        self._noise_gen: torch.Generator | None = None  # t and x_1 come from here
        self.sharded = False  # the transformer is FSDP-sharded (set once: asking walks ~2 000 parameters)

    def seed_step(self, batch_idx: int) -> torch.Generator:
        """Seed this rank's noise generator and torch's RNG (dropout) for this micro-batch.

        The seeds are a function of (train.seed, rank, micro-batch position) only, so every rank
        draws its own stream and a resumed run draws exactly what an uninterrupted one would.
        """
        acc = self.trainer.accumulate_grad_batches
        position = self.global_step * acc + batch_idx % acc
        noise_seed, torch_seed = np.random.SeedSequence([self.cfg.train.seed, self.global_rank, position]) \
            .generate_state(2)
        if self._noise_gen is None:
            self._noise_gen = torch.Generator(self.device)
        torch.manual_seed(int(torch_seed))
        return self._noise_gen.manual_seed(int(noise_seed))

    # -- building ------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self._build()
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ShardedStrategy) and not is_sharded(self.model):
            shard_model(self.model, strategy.device_mesh["data_parallel"])
        self.sharded = is_sharded(self.model)

    def _build(self) -> Vis2IRModel:
        cfg = self.cfg
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        # Full training keeps fp32 master weights (autocast does the bf16 maths; with bf16-true the optimizer
        # holds them); LoRA trains fp32 (bf16-true: bf16) adapters over a frozen base in the model's dtype.
        true_bf16 = cfg.train.precision == "bf16-true"
        dtype = torch.bfloat16 if true_bf16 else torch.float32 if cfg.train.finetune == "full" else None
        if cfg.train.init_from:
            # checked against cfg by `train` (check_init_from); a resume: its base where it is now, or its own
            # checkpoint (full: the whole transformer, so the base is not needed)
            source = self.source or find_checkpoint(cfg.train.init_from)
            model = build_with_weights(source, cfg, device, dtype)
            if cfg.train.finetune == "full":
                merge_lora(model.transformer)  # from a LoRA checkpoint: train, and save, whole weights
            log.info("Initialised from %s", source)
        else:
            model = build_model(cfg, device, dtype)
        return prepare_for_training(model, cfg)

    # -- data (here, where each process knows its rank) -----------------------------------------

    def train_dataloader(self) -> DataLoader:
        return split_loader(self.cfg, self.trainer, "train", self.start_step, self.data)

    def val_dataloader(self) -> DataLoader | list:
        return split_loader(self.cfg, self.trainer, "val")

    # -- steps ---------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int):
        """One micro-batch → its flow-matching loss (the bad-step guard sees it; logged per step)."""
        cfg, model = self.cfg.train, self.model
        vis, ir, sem = batch.get("visible"), batch.get("infrared"), batch.get("semantic")
        g = self.seed_step(batch_idx)
        if cfg.semantic_dropout > 0 and sem is not None:  # some maps become unknown (drawn first from g)
            sem = drop_maps(sem, cfg.semantic_dropout, g)
        if "x_0" in batch:  # from `data.latent_cache`: the codec is skipped
            from vis2ir.latent_cache import to_encoded

            enc = to_encoded(batch, model.codec, self.cfg)
        else:
            enc = model.encode(vis, ir, sem)
        n = enc.x_0.shape[0]
        t = sample_timesteps(n, cfg.timestep_mean, cfg.timestep_std, cfg.timestep_shift, g)
        noise = sample_noise(enc.x_0.float(), cfg.offset_noise, g, offset_group(model.codec))
        if self.global_step < 2 and log.isEnabledFor(logging.DEBUG):
            log_shapes(model, batch, enc)
        pred, target = model(vis, ir, sem, t, noise, guidance=cfg.guidance, encoded=enc)
        tokens = model.target_tokens(enc) if cfg.loss_region == "target" else None
        loss = flow_loss(pred, target, tokens)
        # Decided on the device, without waiting for it: `on_before_optimizer_step` skips the update of a step
        # with a non-finite loss or gradient (every DDP rank together), and counts it on the host later.
        self.guard.see_loss(loss)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=n)
        if model.adapter is not None:
            for i, layer in enumerate(model.adapter.layers):  # tensors: no GPU→CPU sync per step
                self.log(f"train/scale_{i}", layer.scale.detach(), prog_bar=i == 0, on_step=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        """Loss at fixed flow times and fixed noise (`objective.fixed_draw_loss`), so curves are comparable."""
        model = self.model
        vis, ir, sem = batch["visible"], batch["infrared"], batch.get("semantic")
        loss = fixed_draw_loss(model, vis, ir, sem, torch.Generator().manual_seed(1000 + batch_idx),
                               self.cfg.train.guidance, self.cfg.train.loss_region)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=vis.shape[0])
        # A sharded model's forward is a collective: every rank samples, rank 0 writes.
        if batch_idx == 0 and (self.trainer.is_global_zero or self.sharded):
            self._sample_grid(vis[:4], ir[:4], None if sem is None else sem[:4], write=self.trainer.is_global_zero)
        return loss

    def _sample_grid(self, vis, ir, sem, write: bool = True) -> None:
        """The validation samples picture of this step (`progress.samples_picture`)."""
        samples_picture(self.model, self.cfg, self.global_step, self.loggers, vis, ir, sem, write)

    # -- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self):
        groups = param_groups(self.model, self.cfg.train)
        if self.cfg.train.precision == "bf16-true":
            groups = self.masters.groups(groups)
        return build_optimizer(groups, self.cfg.train, self.sharded)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)
        self.masters.copy_back()

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the update of a step whose loss or gradients are not finite, on the device (`BadStepGuard`);
        clip the gradients; count the bad steps of the step before (at once on the CPU)."""
        self.masters.take_grads()  # bf16 gradients → the fp32 masters the optimizer updates
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.sharded:  # FSDP reduced the shards' gradients; the whole adapter's are averaged here
            average_replicated_grads(params, self.trainer.strategy)
        norm = total_norm([p.grad for p in params]) if params else None  # sharded and whole gradients together
        # Under fp16 loss scaling inf gradients are the scaler's business (it skips the step and lowers the
        # scale), not a bad step.
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        self.guard.skip_if_bad(optimizer, params, norm, self.global_step, scaled, self.trainer.world_size,
                               self.device)
        clip = self.cfg.train.grad_clip
        if norm is not None and clip:  # clip by the norm just computed (as clip_grad_norm_), not a second pass
            clip_grads(params, clip, norm)  # sharded and whole gradients alike
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True)
        if self._log_now():
            for group in optimizer.param_groups:
                self.log(f"train/lr_{group.get('name', 'group')}", group["lr"], on_step=True)
        self.guard.count(lag=1 if self.device.type == "cuda" else 0)

    def _log_now(self) -> bool:
        """Whether Lightning writes this step's scalars (scalars logged as Python numbers cost a copy to the GPU)."""
        return self.trainer._logger_connector.should_update_logs

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._step_started is None:
            return
        dt = time.perf_counter() - self._step_started
        if self._first_step and self.cfg.train.compile:
            log.info("First training step (compiling the transformer's blocks): %.1f s", dt)
        self._first_step = False
        if self._log_now():
            n = len(batch["name"]) * self.trainer.world_size
            self.log("train/step_time", dt, on_step=True)
            self.log("train/samples_per_s", n / dt, on_step=True)

    def on_train_end(self) -> None:
        self.guard.count()

    # -- resume state: trainable weights only (the frozen base is rebuilt from config; RNG: `seed_step`)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self.masters.pairs:  # bf16-true: the fp32 masters, so that a resume continues exactly
            checkpoint["master_weights"] = self.masters.state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.masters.loaded = checkpoint.get("master_weights")  # before `configure_optimizers` runs

    def weights_are_finite(self) -> bool:
        """Whether every trainable tensor is finite (on every rank); one device sync. Counts the pending bad
        steps first (a streak stops training before a checkpoint)."""
        self.guard.count()
        params = [local(p.detach()) for p in self.model.parameters() if p.requires_grad]  # this rank's shards
        finite = torch.stack([p.isfinite().all() for p in params]).all() if params else torch.tensor(True)
        return self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True)


def log_shapes(model: Vis2IRModel, batch: dict, enc: Encoded) -> None:
    """Log (DEBUG) the shapes of a training batch on its way into the transformer (`--debug`)."""
    log.debug("===== %s semantic mode =====", model.mode)
    for key, name in (("visible", "visible_img"), ("infrared", "target_img"), ("semantic", "semantic_img")):
        if key in batch:
            log.debug("%s: %s", name, tuple(batch[key].shape))
    log.debug("canvas: %s", (enc.x_0.shape[0], 3, enc.height, enc.width))
    log.debug("x_0: %s", tuple(enc.x_0.shape))
    log.debug("x_cond: %s", tuple(enc.x_cond.shape))
    if enc.semantic_tokens is not None:
        log.debug("semantic_tokens: %s", tuple(enc.semantic_tokens.shape))
    if model.adapter is not None:
        for i, s in enumerate(model.adapter.scales()):
            log.debug("Layer %d scale: %.6f", i, s)
    log.debug("hidden_states (final): %s", (*enc.x_0.shape[:2], model.transformer.config.in_channels))
