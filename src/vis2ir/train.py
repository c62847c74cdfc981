"""`vis2ir train`: flow-matching training of LoRA (or the whole transformer) and the adapter.

Lightning runs the loop, the devices and the strategy (DDP, or FSDP2 through `sharding.py`; DeepSpeed
is refused); this file says what one step does (docs/design.md §1, §3):

    t ~ sigmoid(N(mean, std)) (optionally shifted);  x_1 ~ N(0, I) (+ offset noise)
    v̂ = model(x_t = (1 − t)·x_0 + t·x_1);  loss = mse(v̂, x_1 − x_0) over all or target tokens

A step is one (accumulated) batch. A step whose loss or gradients are NaN/inf still counts but
changes no weight (the fused AdamW skips it on the device; other optimizers get no gradients), so step N's checkpoint has read N batches, the logs
say N, and a resume from it reads batch N next. Checkpoints (`checkpoint.py` layout) are written
every `train.checkpoint_every` steps, at the end and on a stop (Ctrl-C, SIGTERM, SIGUSR1,
`train.max_minutes`: at an optimizer-step boundary, `run_control`), only when every trainable tensor is
finite, each with its run identity (`run_identity`); `--resume` continues a run exactly (same data order,
and every rank's noise and RNG are a function of the seed, the rank and the step) with the run's own
settings (`check_resumable`) and data.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from vis2ir.checkpoint import (RESUME_FILE, add_lora, build_with_weights, check_init_from, check_intact,
                               checkpoint_size, failed_save, find_checkpoint, list_checkpoints, load_checkpoint_config,
                               merge_lora, replace_dir, resolve_init_from, save_resume_state, temp_dir, write_manifest,
                               write_weights)
from vis2ir.config import Config, load_config, role_prefixes
from vis2ir.data.order import Positioned, StepSampler  # noqa: F401 (the data order; `vis2ir.train` names them too)
from vis2ir.errors import Vis2IRError
from vis2ir.files import check_writable
from vis2ir.model import Encoded, Vis2IRModel, build_model
from vis2ir.quantize import out_of_memory
from vis2ir.run_control import StepBoundaryStop, check_new_run, check_unfinished, stop_message
from vis2ir.run_identity import KeepOptimizerFlags, check_resume_identity, run_identity, write_run_identity
from vis2ir.semantic.modes import NEEDS_SEMANTIC
from vis2ir.sharding import (ShardedStrategy, average_replicated_grads, clip_grads, is_sharded, local, shard_model,
                             total_norm, trainable_state)
from vis2ir.signals import StopRequests, Stopped

log = logging.getLogger(__name__)


def _no_tips(record: logging.LogRecord) -> bool:
    """Lightning's "💡 Tip: try installing litlogger / litmodels" lines (advertising printed on every run)."""
    return not str(record.msg).startswith("💡 Tip:")


# Lightning installs its own console handlers; let its records reach ours, in our format, without its tips
# (rank_zero_info logs them through these loggers; its warnings pass).
for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
              "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).handlers.clear()
    logging.getLogger(_name).propagate = True
    logging.getLogger(_name).addFilter(_no_tips)


# ----------------------------------------------------------------------------------------------
# The pieces of one step


def sample_timesteps(n: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal flow times in (0, 1); `shift > 1` moves them towards the noise end."""
    device = generator.device if generator is not None else None
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    return shift * t / (1 + (shift - 1) * t) if shift != 1.0 else t


def sample_noise(x_0: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None,
                 group: int = 4) -> torch.Tensor:
    """x_1 ~ N(0, I) shaped as the packed tokens `x_0` `[B, N, D]`, plus offset noise when `offset > 0`: one
    N(0, offset²) value per sample and channel, the same at every position of the image.

    A packed token holds its channels one after the other (`latents.pack`: channel-major, index c·4 + 2i + j
    for the 2×2 patch), so a channel is `group` consecutive entries (`offset_group`: 4 for a VAE's latents,
    4·s² for the pixel codec, whose s×s sub-pixels of one colour are one channel)."""
    kw = dict(generator=generator, device=x_0.device, dtype=x_0.dtype)
    noise = torch.randn(x_0.shape, **kw)
    if offset > 0:
        channels = torch.randn(x_0.shape[0], 1, x_0.shape[2] // group, **kw)
        noise = noise + offset * channels.repeat_interleave(group, dim=2)
    return noise


def offset_group(codec) -> int:
    """Entries of a packed token that belong to one image channel (`sample_noise`'s `group`)."""
    from vis2ir.latents import PixelCodec, as_codec

    codec = as_codec(codec)
    return 4 * codec.scale_factor ** 2 if isinstance(codec, PixelCodec) else 4


def flow_loss(pred: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all tokens, or over the tokens selected by the boolean `[N]` mask."""
    err = (pred.float() - target.float()).square()
    if tokens is None:
        return err.mean()
    # A weighted mean, not err[:, tokens]: boolean indexing would wait for the GPU to count the tokens.
    return (err * tokens.view(1, -1, 1)).sum() / (tokens.sum() * err.shape[0] * err.shape[2])


# ----------------------------------------------------------------------------------------------
# The Lightning module


class Vis2IRModule(L.LightningModule):
    """Owns a `Vis2IRModel`, its trainable parameters and their optimizer."""

    def __init__(self, cfg: Config, model: Vis2IRModel | None = None, start_step: int = 0):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.start_step = start_step
        self.strict_loading = False  # resume states hold only the trainable weights
        self._bad_steps = 0
        self._loss_bad: torch.Tensor | None = None  # on the device: a micro-batch of this step had a NaN/inf loss
        self._loss_seen: torch.Tensor | None = None  # … and that loss (the last non-finite one), for the message
        self._pending: list[tuple] = []  # (step, loss, norm, bad, event) of steps not yet counted on the host
        self._masters: list[tuple[torch.Tensor, torch.Tensor]] = []  # (bf16 weight, its fp32 master) for bf16-true
        self._loaded_masters: list[torch.Tensor] | None = None
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
            source = find_checkpoint(cfg.train.init_from)  # checked against cfg by `train` (check_init_from)
            model = build_with_weights(source, cfg, device, dtype)
            if cfg.train.finetune == "full":
                merge_lora(model.transformer)  # from a LoRA checkpoint: train, and save, whole weights
            log.info("Initialised from %s", source)
        else:
            model = build_model(cfg, device, dtype)
        return prepare_for_training(model, cfg)

    # -- data (here, where each process knows its rank) -----------------------------------------

    def train_dataloader(self) -> DataLoader:
        return split_loader(self.cfg, self.trainer, "train", self.start_step)

    def val_dataloader(self) -> DataLoader | list:
        return split_loader(self.cfg, self.trainer, "val")

    # -- steps ---------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int):
        cfg = self.cfg.train
        model = self.model
        vis, ir, sem = batch.get("visible"), batch.get("infrared"), batch.get("semantic")
        if "x_0" in batch:  # from `data.latent_cache`: the codec is skipped
            from vis2ir.latent_cache import to_encoded

            enc = to_encoded(batch, model.codec, self.cfg)
        else:
            enc = model.encode(vis, ir, sem)
        n = enc.x_0.shape[0]
        g = self.seed_step(batch_idx)
        t = sample_timesteps(n, cfg.timestep_mean, cfg.timestep_std, cfg.timestep_shift, g)
        noise = sample_noise(enc.x_0.float(), cfg.offset_noise, g, offset_group(model.codec))
        if self.global_step < 2 and log.isEnabledFor(logging.DEBUG):
            self._debug_shapes(batch, enc)
        pred, target = model(vis, ir, sem, t, noise, guidance=cfg.guidance, encoded=enc)
        tokens = model.target_tokens(enc) if cfg.loss_region == "target" else None
        loss = flow_loss(pred, target, tokens)
        # Decided on the device, without waiting for it: `on_before_optimizer_step` skips the update of a step
        # with a non-finite loss or gradient (every DDP rank together), and counts it on the host later.
        bad = ~torch.isfinite(loss.detach())
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        seen = loss.detach().float()
        self._loss_seen = seen if self._loss_seen is None else torch.where(bad, seen, self._loss_seen)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=n)
        if model.adapter is not None:
            for i, layer in enumerate(model.adapter.layers):  # tensors: no GPU→CPU sync per step
                self.log(f"train/scale_{i}", layer.scale.detach(), prog_bar=i == 0, on_step=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        """Loss at fixed flow times (0.25, 0.5, 0.75) and fixed noise, so curves are comparable."""
        model = self.model
        vis, ir, sem = batch["visible"], batch["infrared"], batch.get("semantic")
        enc = model.encode(vis, ir, sem)
        g = torch.Generator().manual_seed(1000 + batch_idx)
        tokens = model.target_tokens(enc) if self.cfg.train.loss_region == "target" else None
        losses = []
        for tv in (0.25, 0.5, 0.75):
            t = torch.full((vis.shape[0],), tv, device=vis.device)
            noise = torch.randn(enc.x_0.shape, generator=g).to(enc.x_0.device)
            pred, target = model(vis, ir, sem, t, noise, guidance=self.cfg.train.guidance, encoded=enc)
            losses.append(flow_loss(pred, target, tokens))
        loss = torch.stack(losses).mean()
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=vis.shape[0])
        # A sharded model's forward is a collective: every rank samples, rank 0 writes.
        if batch_idx == 0 and (self.trainer.is_global_zero or self.sharded):
            self._sample_grid(vis[:4], ir[:4], None if sem is None else sem[:4], write=self.trainer.is_global_zero)
        return loss

    @torch.no_grad()
    def _sample_grid(self, vis, ir, sem, write: bool = True) -> None:
        """visible | generated | ground truth | semantic, saved under samples/ and sent to TensorBoard
        (`write=False`: generated only, for a sharded model's forward that every rank must join)."""
        from vis2ir.figures import figure_array, save_figure
        from vis2ir.io.images import is_finite
        from vis2ir.sample import generate
        from vis2ir.visualize import labelled_grid

        s = self.cfg.sample
        generated = generate(self.model, vis, sem if self.model.mode != "none" else None, steps=s.steps,
                             guidance=s.guidance, seed=s.seed)
        if not write:
            return
        if not is_finite(generated):  # a black grid would look like a result
            log.warning("step %d: the validation samples are not finite (NaN/inf); no samples picture written",
                        self.global_step)
            return
        columns = {"visible": vis, "generated": generated, "truth": ir}
        if sem is not None:
            columns["semantic"] = sem
        fig = labelled_grid(columns, title=f"Validation samples at step {self.global_step} "
                                           f"({s.steps} sampling steps, guidance {s.guidance:g})")
        path = save_figure(Path(self.cfg.train.output_dir) / "samples" / f"step-{self.global_step}.png", fig)
        grid = figure_array(fig)
        for logger in self.loggers:
            if hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image("val/samples", grid, self.global_step, dataformats="HWC")
        log.info("Validation samples: %s", path)

    def _debug_shapes(self, batch: dict, enc: Encoded) -> None:
        m = self.model
        log.debug("===== %s semantic mode =====", m.mode)
        for key, name in (("visible", "visible_img"), ("infrared", "target_img"), ("semantic", "semantic_img")):
            if key in batch:
                log.debug("%s: %s", name, tuple(batch[key].shape))
        log.debug("canvas: %s", (enc.x_0.shape[0], 3, enc.height, enc.width))
        log.debug("x_0: %s", tuple(enc.x_0.shape))
        log.debug("x_cond: %s", tuple(enc.x_cond.shape))
        if enc.semantic_tokens is not None:
            log.debug("semantic_tokens: %s", tuple(enc.semantic_tokens.shape))
        if m.adapter is not None:
            for i, s in enumerate(m.adapter.scales()):
                log.debug("Layer %d scale: %.6f", i, s)
        log.debug("hidden_states (final): %s", (*enc.x_0.shape[:2], m.transformer.config.in_channels))

    # -- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self):
        cfg = self.cfg.train
        model = self.model
        adapter_ids = {id(p) for p in model.adapter.parameters()} if model.adapter is not None else set()
        backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids]
        groups = [{"params": backbone, "lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "name": "backbone"}]
        if model.adapter is not None:
            adapter = list(model.adapter.parameters())
            groups.append({"params": adapter, "lr": cfg.adapter_learning_rate or cfg.learning_rate,
                           "weight_decay": cfg.adapter_weight_decay, "name": "adapter"})
            log.info("Added %d semantic cross-attention parameters to optimizer", sum(p.numel() for p in adapter))
        log.info("Trainable %s parameters: %d", "LoRA" if cfg.finetune == "lora" else "transformer",
                 sum(p.numel() for p in backbone))
        groups = self._master_groups(groups)
        if cfg.optimizer == "prodigy":
            from prodigyopt import Prodigy

            optimizer = Prodigy(groups, lr=cfg.learning_rate, use_bias_correction=True, safeguard_warmup=True,
                                weight_decay=cfg.weight_decay)
        else:
            # fused: one kernel per step, and it skips a step on the device when told (`found_inf`); not under
            # fp16 loss scaling, where Lightning unscales the gradients itself before clipping, nor on FSDP's
            # sharded parameters (a device flag beside DTensors; a bad step there drops its gradients instead)
            optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                          fused=cfg.precision != "16-mixed" and not self.sharded)
        warmup = cfg.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _master_groups(self, groups: list[dict]) -> list[dict]:
        """With `train.precision: bf16-true` the optimizer updates fp32 master copies of the bf16 weights (a
        bf16 weight cannot take an update much smaller than itself); `optimizer_step` copies them back."""
        if self.cfg.train.precision != "bf16-true":
            return groups
        loaded = iter(self._loaded_masters or ())
        out = []
        for group in groups:
            params = []
            for p in group["params"]:
                if p.dtype == torch.float32:
                    params.append(p)
                    continue
                master = next(loaded, None)
                master = (p.detach().float() if master is None else master.to(p.device)).clone()
                self._masters.append((p, master))
                params.append(master)
            out.append({**group, "params": params})
        self._loaded_masters = None
        return out

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)
        if self._masters:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in self._masters], [m for _, m in self._masters])

    def on_before_optimizer_step(self, optimizer) -> None:
        """Skip the update of a step whose loss or gradients are not finite, on the device; count it later.

        The decision never waits for the GPU: the fused AdamW skips the step itself (`found_inf`, as under
        loss scaling), and the host reads the step's flags one step later (at once on the CPU) to count bad
        steps, warn and stop after `train.max_bad_steps` in a row.
        """
        for p, master in self._masters:  # bf16 gradients → the fp32 masters the optimizer updates
            master.grad = p.grad.float() if p.grad is not None else None
            p.grad = None
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if self.sharded:  # FSDP reduced the shards' gradients; the whole adapter's are averaged here
            average_replicated_grads(params, self.trainer.strategy)
        norm = total_norm([p.grad for p in params]) if params else None  # sharded and whole gradients together
        # Under fp16 loss scaling inf gradients are the scaler's business (it skips the step and lowers the
        # scale), not a bad step.
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        zero = torch.zeros((), dtype=torch.bool, device=self.device)
        loss_bad = self._loss_bad if self._loss_bad is not None else zero
        grad_bad = ~torch.isfinite(norm) if norm is not None and not scaled else zero
        bad = (loss_bad | grad_bad).float()
        if self.trainer.world_size > 1:  # every rank skips together
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        loss = self._loss_seen if self._loss_seen is not None else zero.float()
        self._loss_bad = self._loss_seen = None
        raw = getattr(optimizer, "optimizer", optimizer)
        if isinstance(raw, torch.optim.AdamW) and raw.defaults.get("fused"):
            raw.found_inf = bad
        elif bool(bad):  # other optimizers cannot skip on the device: drop the gradients (one sync)
            for p in params:
                p.grad = None
        clip = self.cfg.train.grad_clip
        if norm is not None and clip:  # clip by the norm just computed (as clip_grad_norm_), not a second pass
            clip_grads(params, clip, norm)  # sharded and whole gradients alike
        if norm is not None:
            self.log("train/grad_norm", norm, on_step=True)
        if self._log_now():
            for group in optimizer.param_groups:
                self.log(f"train/lr_{group.get('name', 'group')}", group["lr"], on_step=True)
        self._pending.append(self._to_host(self.global_step, loss, norm if norm is not None else zero.float(), bad))
        self._count_bad_steps(lag=1 if self.device.type == "cuda" else 0)

    @staticmethod
    def _to_host(step: int, *values: torch.Tensor) -> tuple:
        """Start copying a step's flags to the host without waiting; `_count_bad_steps` reads them."""
        if values[0].device.type != "cuda":
            return step, *values, None
        host = torch.stack([v.detach().float() for v in values]).to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return step, host, event

    def _count_bad_steps(self, lag: int = 0) -> None:
        """Count the bad steps of all but the newest `lag` pending steps; warn; stop after a streak."""
        while len(self._pending) > lag:
            step, *values, event = self._pending.pop(0)
            if event is not None:
                event.synchronize()
                values = values[0].tolist()
            else:
                values = [float(v) for v in values]
            loss, norm, bad = values
            if not bad:
                self._bad_steps = 0
                continue
            self._report_bad_step(step, "loss" if not np.isfinite(loss) else "gradient norm",
                                  loss if not np.isfinite(loss) else norm)

    def _log_now(self) -> bool:
        """Whether Lightning writes this step's scalars (scalars logged as Python numbers cost a copy to the GPU)."""
        return self.trainer._logger_connector.should_update_logs

    def _report_bad_step(self, step: int, what: str, value: float) -> None:
        self._bad_steps += 1
        cfg = self.cfg.train
        log.warning("step %d: %s is %s (%d/%d bad steps in a row); skipping the update", step, what,
                    value, self._bad_steps, cfg.max_bad_steps)
        if self._bad_steps >= cfg.max_bad_steps:
            kept = list_checkpoints(cfg.output_dir)  # only finite weights are ever written
            raise Vis2IRError(
                f"training stopped at step {step}: the {what} was NaN/inf for {self._bad_steps} steps "
                f"in a row (train.max_bad_steps); "
                + (f"the last good checkpoint is kept: {kept[-1]}" if kept else
                   f"no checkpoint with finite weights was written under {Path(cfg.output_dir) / 'checkpoints'}")
                + "; try a lower train.learning_rate")

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
        self._count_bad_steps()

    # -- resume state: trainable weights only (the frozen base is rebuilt from config; RNG: `seed_step`)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        if self._masters:  # bf16-true: the fp32 masters, so that a resume continues exactly
            checkpoint["master_weights"] = [m.detach().cpu() for _, m in self._masters]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._loaded_masters = checkpoint.get("master_weights")  # before `configure_optimizers` runs

    def weights_are_finite(self) -> bool:
        """Whether every trainable tensor is finite (on every rank); one device sync. Counts the pending bad
        steps first (a streak stops training before a checkpoint)."""
        self._count_bad_steps()
        params = [local(p.detach()) for p in self.model.parameters() if p.requires_grad]  # this rank's shards
        finite = torch.stack([p.isfinite().all() for p in params]).all() if params else torch.tensor(True)
        return self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True)


def prepare_for_training(model: Vis2IRModel, cfg: Config) -> Vis2IRModel:
    """LoRA (fp32 adapters on a frozen base; bf16 with `train.precision: bf16-true`) or full training;
    gradient checkpointing of every block, none, or as a memory budget needs (`auto`); compiled blocks."""
    from vis2ir import blocks
    from vis2ir.speedup import compile_blocks

    true_bf16 = cfg.train.precision == "bf16-true"
    transformer = model.transformer
    if true_bf16:
        transformer.to(torch.bfloat16)
    if cfg.train.finetune == "lora":
        if not getattr(transformer, "peft_config", None):  # else LoRA came with `train.init_from`
            add_lora(transformer, cfg.model.lora)
        for name, p in transformer.named_parameters():
            p.requires_grad_("lora_" in name)
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16 if true_bf16 else torch.float32)
    else:
        transformer.requires_grad_(True)
    if model.adapter is not None:
        model.adapter.float().requires_grad_(True)
    checkpointing = cfg.train.gradient_checkpointing
    if checkpointing == "auto":
        image_tokens, text_tokens = training_tokens(model, cfg)
        precision = resolved_precision(cfg, next(transformer.parameters()).device.type == "cuda")
        autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        blocks.plan_checkpointing(transformer, model, cfg.train.memory_budget_gib, cfg.train.batch_size,
                                  image_tokens, text_tokens, optimizer_states=4 if cfg.train.optimizer == "prodigy" else 2,
                                  autocast=autocast)
    elif checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    if cfg.train.compile:
        compile_blocks(transformer, setting="train.compile")
    return model


def resolved_precision(cfg: Config, cuda: bool) -> str:
    """`train.precision` with `auto` made concrete: bf16-mixed on a GPU, 32-true on the CPU."""
    return cfg.train.precision if cfg.train.precision != "auto" else ("bf16-mixed" if cuda else "32-true")


def training_tokens(model: Vis2IRModel, cfg: Config) -> tuple[int, int]:
    """(image tokens, text tokens) of one training sample: the canvas of `data.size` panels, the prompt."""
    from vis2ir.latents import token_grid
    from vis2ir.semantic.modes import num_panels

    rows, cols = token_grid(model.codec, cfg.data.size, cfg.data.size * num_panels(model.mode))
    return rows * cols, model.prompt_embeds.shape[1]


# ----------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointExport(L.Callback):
    """Writes `checkpoints/step-N/` (weights, config, resume state) atomically; keeps the last K.

    Never writes weights that are not all finite, and prunes only checkpoints older than the one it
    has just written: the newest good checkpoint always survives, and a resumed run deletes nothing
    of the old one before it has written a newer checkpoint. Ctrl-C writes the last finished step.
    Every checkpoint holds its run identity, `run.json` (`vis2ir.run_identity`; `data`: the training
    data's fingerprint), written before the folder is published.
    """

    def __init__(self, cfg: Config, run_dir: Path, data: dict | None = None):
        self.cfg, self.run_dir, self.last, self.data = cfg, run_dir, -1, data

    def on_train_start(self, trainer, module) -> None:
        self.last = trainer.global_step  # a resumed run's first step is on disk already

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.cfg.train.checkpoint_every == 0:
            self.save(trainer, module, step)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_step > 0:
            self.save(trainer, module, trainer.global_step)

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt):
            return
        # Optimizer steps finished; the interrupted one is redone on resume (from its first micro-batch:
        # `StepBoundaryStop.on_save_checkpoint` puts the loop counters back to the step's boundary).
        step = trainer.global_step
        if step > 0:
            self.save(trainer, module, step)
        kept = list_checkpoints(self.run_dir)
        if trainer.is_global_zero:
            log.warning("Interrupted at step %d; %s; resume with: %s", step,
                        f"newest checkpoint {kept[-1]}" if kept else "no checkpoint was written",
                        resume_command(self.run_dir) if kept else "(nothing to resume)")

    def save(self, trainer, module: Vis2IRModule, step: int) -> None:
        if step == self.last:
            return
        self.last = step
        final = self.run_dir / "checkpoints" / f"step-{step}"
        if not module.weights_are_finite():
            kept = [p for p in list_checkpoints(self.run_dir) if int(p.name[5:]) < step]
            log.warning("step %d: the trainable weights are not all finite; no checkpoint written (%s)", step,
                        f"the last good one is {kept[-1]}" if kept else "none written before")
            return
        tmp = trainer.strategy.broadcast(temp_dir(final))  # rank 0's name: every rank writes there
        state = trainable_state(module.model)  # every rank: under FSDP it gathers the shards to rank 0
        error = None
        if trainer.is_global_zero:
            try:
                tmp.mkdir(parents=True)
                write_weights(tmp, module.model, self.cfg, state)
            except OSError as err:  # a full disk: one line, and no partial folder
                error = err
        if trainer.strategy.broadcast(error is not None):
            raise failed_save(tmp, final, error, checkpoint_size(module.model, self.cfg))
        trainer.strategy.barrier()
        try:
            save_resume_state(trainer, tmp / RESUME_FILE)  # staged in tmp, never the system temp folder
            if trainer.is_global_zero:
                write_run_identity(tmp, run_identity(step, self.data, self.cfg.train.init_from))
                write_manifest(tmp)
                replace_dir(tmp, final)
        except OSError as err:
            raise failed_save(tmp, final, err, checkpoint_size(module.model, self.cfg)) from None
        if trainer.is_global_zero:
            older = [p for p in list_checkpoints(self.run_dir) if int(p.name[5:]) < step]
            for old in older[:max(0, len(older) - (self.cfg.train.keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("Saved checkpoint %s", final)
        trainer.strategy.barrier()


class LogLastStep(L.Callback):
    """Logs the last step of a launch even when it is not a multiple of `train.log_every` (Lightning logs
    only those), so a run shorter than `log_every` still writes its metrics."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if 0 <= trainer.max_steps <= trainer.global_step:  # Lightning writes the step's metrics right after
            trainer.log_every_n_steps = 1


class StepProgressBar(TQDMProgressBar):
    """Counts the optimizer steps of this launch out of those it will run (`train.max_steps` minus the
    step it resumed from), not epochs: training is one endless epoch that ends at `max_steps`."""

    def on_train_start(self, trainer, module) -> None:
        super().on_train_start(trainer, module)
        self.on_train_epoch_start(trainer, module)

    def on_train_epoch_start(self, trainer, module) -> None:
        """The bar of this launch (a resumed launch starts inside its epoch: `on_train_start` calls this)."""
        self._first = trainer.global_step
        bar = self.train_progress_bar
        bar.reset(total=max(0, trainer.max_steps - self._first))
        bar.initial = 0
        bar.set_description(f"train steps {self._first + 1}-{trainer.max_steps}" if self._first else "train steps",
                            refresh=False)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        n = trainer.global_step - self._first
        bar = self.train_progress_bar
        if n != bar.n and self._should_update(n, bar.total):
            bar.n = n
            bar.refresh()
            if n % trainer.log_every_n_steps == 0 or n == bar.total:  # reading the scalars waits for the GPU
                bar.set_postfix(self.get_metrics(trainer, module))

    @property
    def train_description(self) -> str:
        return "train steps"

    def get_metrics(self, trainer, module) -> dict:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)  # the launch's log folder number, not a measurement
        return metrics


class _StepNamed:
    """Logs a step's scalars under the number of optimizer steps done with it, the N of the checkpoint
    `step-N` written after it (Lightning passes the count before the step: one less)."""

    def log_metrics(self, metrics, step=None):
        return super().log_metrics(metrics, None if step is None else step + 1)


class StepCSVLogger(_StepNamed, CSVLogger):
    """`logs/version_K/metrics.csv`, steps numbered as checkpoints."""


class StepTensorBoardLogger(_StepNamed, TensorBoardLogger):
    """`tensorboard/version_K/`, steps numbered as checkpoints."""


def resume_command(run_dir: Path) -> str:
    """The command line that continues the run in `run_dir` with its own settings."""
    return f"vis2ir train --resume {shlex.quote(str(run_dir))}"


# ----------------------------------------------------------------------------------------------
# Entry point


LOG_DIRS = ("logs", "tensorboard")  # the CSV and TensorBoard loggers' folders; one version_K per launch


def log_versions(run_dir: str | Path) -> set[Path]:
    """The launch folders (`logs/version_K`, `tensorboard/version_K`) that exist in `run_dir`."""
    return {p for name in LOG_DIRS for p in Path(run_dir).glob(f"{name}/version_*") if p.is_dir()}


def metrics_logs(run_dir: str | Path) -> list[Path]:
    """The run's CSV scalar logs (`logs/version_N/metrics.csv`), one per launch, oldest first."""
    paths = Path(run_dir).glob("logs/version_*/metrics.csv")
    return sorted(paths, key=lambda p: int(p.parent.name.rpartition("_")[2]))


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """`--resume latest` → the newest checkpoint of this run; a folder → its resume state."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise Vis2IRError(f"--resume latest: no checkpoint under {run_dir / 'checkpoints'}")
        folder = found[-1]
    else:
        folder = Path(resume).expanduser()
        if not folder.exists():
            raise Vis2IRError(f"--resume {resume}: no such folder (expected a checkpoint folder or a run folder)")
        found = [] if (folder / RESUME_FILE).exists() else list_checkpoints(folder)
        folder = found[-1] if found else folder
    state = folder / RESUME_FILE
    if not state.exists() and not (folder / "config.yaml").exists() and folder.parent.name != "checkpoints":
        raise Vis2IRError(f"--resume {resume}: {state} not found (expected a checkpoint folder or a run folder)")
    check_intact(folder, resume=True)  # a checkpoint copied incompletely: the damaged file, the newest intact one
    return state


def build_trainer(cfg: Config, run_dir: Path, callbacks=(), loggers=True, progress: bool = True,
                  data: dict | None = None, stop: StopRequests | None = None) -> L.Trainer:
    """The Trainer of a launch: our checkpoints (`data`: the fingerprint their run.json records), stops between
    optimizer steps only (`stop`: the signal flags; `train.max_minutes` per launch, not Lightning's Timer)."""
    t = cfg.train
    cuda = torch.cuda.is_available() and t.accelerator != "cpu"
    precision = resolved_precision(cfg, cuda)
    # bf16-true is ours (`prepare_for_training`, `_master_groups`): bf16 transformer, fp32 adapter and masters;
    # Lightning's own would cast the adapter and the inputs too. So Lightning adds nothing.
    precision = "32-true" if precision == "bf16-true" else precision
    strategy = t.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=False)
    elif strategy == "fsdp":
        strategy = ShardedStrategy()
    export = CheckpointExport(cfg, run_dir, data)
    stops = StepBoundaryStop(stop or StopRequests(), export.save, None if t.max_minutes is None else t.max_minutes * 60,
                             resume_command(run_dir))
    if loggers is True:
        # One version folder per launch, so a resumed run adds its logs beside the first ones.
        loggers = [StepCSVLogger(run_dir, name="logs"), StepTensorBoardLogger(run_dir, name="tensorboard")]
    bar = [StepProgressBar()] if progress else []
    return L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=precision, max_steps=t.max_steps, max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,  # gradients are clipped in on_before_optimizer_step
        log_every_n_steps=t.log_every, val_check_interval=t.val_every * t.accumulate_grad_batches,
        check_val_every_n_epoch=None, limit_val_batches=t.val_batches, num_sanity_val_steps=0,
        default_root_dir=run_dir, logger=loggers,
        callbacks=[export, stops, KeepOptimizerFlags(), LogLastStep(), *bar, *callbacks],
        enable_checkpointing=False, use_distributed_sampler=False,  # our StepSampler splits the ranks
        enable_progress_bar=progress, enable_model_summary=False,
    )


def split_loader(cfg: Config, trainer: L.Trainer, split: str, start_step: int = 0) -> DataLoader | list:
    """The train loader (endless, resumable order), or the validation loader ([] when empty); both are
    the data package's `make_loader`."""
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

        train_set = LatentCache(cfg.data.latent_cache, cfg)
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


# A resumed run may change only these settings (how long, how often it logs and saves, where); the
# rest say what the run is. Dotted prefixes (`sample.`: the validation grids' settings), derived from the
# roles declared in the schema (role "resumable", `vis2ir.roles`); the `train.` ones first, as messages list them.
RESUMABLE = tuple(sorted(role_prefixes("resumable"), key=lambda key: not key.startswith("train.")))


def check_resumable(cfg: Config, checkpoint: Path) -> None:
    """Refuse `cfg` if it changes a setting of the run saved in `checkpoint` outside `RESUMABLE`."""
    old, new = load_checkpoint_config(checkpoint).flat(), cfg.flat()
    for key in sorted(new):
        if not key.startswith(RESUMABLE) and old.get(key) != new[key]:
            raise Vis2IRError(
                f"--resume: {key}={new[key]!r} differs from the run's {old.get(key)!r} ({checkpoint / 'config.yaml'}); "
                f"a resumed run keeps its settings except {', '.join(k.rstrip('.') for k in RESUMABLE)} "
                f"(start a new train.output_dir to change it)")


def resume_config(resume: str, path: str | None = None, overrides=()) -> Config:
    """The settings of `vis2ir train --resume`: the run's saved config, with the given config file's
    settings and the overrides put over it (`train` then refuses those that change the run)."""
    if resume == "latest":
        run_dir = Path(load_config(path, overrides).train.output_dir)
    else:
        run_dir = Path(resume)
    state = resolve_resume(resume, run_dir)
    base = load_checkpoint_config(state.parent)
    if state.parent.parent.name == "checkpoints":  # the run it is in, wherever it was launched from
        base.train.output_dir = str(state.parent.parent.parent)
    return load_config(path, overrides, base=base)


def train(cfg: Config, resume: str | None = None, model: Vis2IRModel | None = None, progress: bool = True,
          callbacks=()) -> Path:
    """Train as `cfg` says; returns the run folder.

    With `resume` ('latest', a run folder or a checkpoint folder) it continues that checkpoint; `cfg`
    must then agree with the run's saved settings outside `RESUMABLE` (else `Vis2IRError`, and
    nothing on disk changes); a finished run (at `train.max_steps`) is refused. Without `resume` the
    output folder must hold no checkpoint (no run to mix with). Ctrl-C, SIGTERM and SIGUSR1 stop at the next
    optimizer-step boundary, write that step's checkpoint and raise `KeyboardInterrupt` (Ctrl-C) or
    `signals.Stopped` (exit status 128 + signal). Raises `Vis2IRError` before any model loads for a bad run
    folder, a resume state written by a newer version, or training data changed since the checkpoint.
    """
    if cfg.model.quantize != "none" and cfg.train.finetune == "full":
        raise Vis2IRError(f"model.quantize={cfg.model.quantize} stores the frozen base quantized, so it trains "
                          "with train.finetune=lora only (LoRA on the quantized base); or set model.quantize=none")
    run_dir = Path(cfg.train.output_dir)
    state = resolve_resume(resume, run_dir)
    if state is None:
        check_new_run(run_dir)
    else:
        check_unfinished(state, _resume_step(state), cfg.train.max_steps, resume)
    cfg = resolve_init_from(cfg, state)  # the concrete base checkpoint, kept in the run's config.yaml
    check_writable(run_dir, "train.output_dir")  # a read-only folder: one line, before the model loads
    if state is not None:
        check_resumable(cfg, state.parent)
    if cfg.train.init_from:
        check_init_from(cfg)
    from vis2ir.data.fingerprint import data_fingerprint

    data = data_fingerprint(cfg.data, "train")  # recorded in every checkpoint's run.json
    if state is not None:
        check_resume_identity(state.parent, data, resume)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    # Our data order is resumable by construction (StepSampler + Positioned), which Lightning cannot see.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    # An empty validation split is announced by `split_loader` and means "no validation".
    warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention backward crashed on Hopper (docs/design.md §9)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    versions = log_versions(run_dir)
    requests = StopRequests()  # installed when training starts
    trainer = build_trainer(cfg, run_dir, callbacks=callbacks, progress=progress, data=data, stop=requests)
    module = Vis2IRModule(cfg, model, start_step=_resume_step(state) if state else 0)
    log.info("Training %s for %d steps (batch %d × %d accumulation × %d devices) into %s", cfg.model.semantic.mode,
             cfg.train.max_steps, cfg.train.batch_size, cfg.train.accumulate_grad_batches, trainer.world_size, run_dir)
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C from its first one on
    try:
        trainer.fit(module, ckpt_path=state, weights_only=True if state else None)
    except BaseException as err:
        if trainer.global_step <= module.start_step:  # failed before its first step: leave no empty version_K
            for folder in log_versions(run_dir) - versions:
                shutil.rmtree(folder, ignore_errors=True)
        if isinstance(err, SystemExit) and trainer.interrupted:  # Lightning's sys.exit(1) after Ctrl-C
            raise KeyboardInterrupt from None
        if isinstance(err, Stopped):  # a stop signal, after saving the step it finished
            if trainer.is_global_zero:
                log.warning(stop_message(err, trainer.global_step, run_dir, resume_command(run_dir)))
            if err.signum == signal.SIGINT:
                raise KeyboardInterrupt from None
        if isinstance(err, torch.OutOfMemoryError):
            raise out_of_memory("training", cfg, trainer.strategy.root_device) from None
        if cfg.train.compile:
            from vis2ir.speedup import compile_failure

            if (failure := compile_failure(err, "train.compile")) is not None:
                raise failure from None
        raise
    finally:
        requests.restore()
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
    return run_dir


def _resume_step(state: Path) -> int:
    name = state.parent.name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    ckpt = torch.load(state, map_location="cpu", weights_only=True, mmap=True)  # the step, not the tensors
    return int(ckpt["global_step"])
