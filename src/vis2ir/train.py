"""`vis2ir train`: flow-matching training of LoRA (or the whole transformer) and the adapter.

Lightning runs the loop, the devices and the strategies (DDP, FSDP, DeepSpeed); this file says
what one step does (DESIGN §1, §3):

    t ~ sigmoid(N(mean, std)) (optionally shifted);  x_1 ~ N(0, I) (+ offset noise)
    v̂ = model(x_t = (1 − t)·x_0 + t·x_1);  loss = mse(v̂, x_1 − x_0) over all or target tokens

Steps count optimizer steps. Checkpoints (`checkpoint.py` layout) are written every
`train.checkpoint_every` steps and at the end, with a resume state; `--resume` continues a run
exactly (same data order, noise and RNG).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vis2ir.checkpoint import (RESUME_FILE, add_lora, find_checkpoint, list_checkpoints, load_checkpoint_config,
                               load_weights, replace_dir, write_weights)
from vis2ir.config import Config
from vis2ir.errors import Vis2IRError
from vis2ir.model import Encoded, Vis2IRModel, build_model
from vis2ir.semantic.modes import NEEDS_SEMANTIC

log = logging.getLogger(__name__)
# Lightning installs its own console handlers; let its records reach ours, in our format.
for _name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).handlers.clear()
    logging.getLogger(_name).propagate = True


# ----------------------------------------------------------------------------------------------
# The pieces of one step


def sample_timesteps(n: int, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Logit-normal flow times in (0, 1); `shift > 1` moves them towards the noise end."""
    device = generator.device if generator is not None else None
    t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    return shift * t / (1 + (shift - 1) * t) if shift != 1.0 else t


def sample_noise(x_0: torch.Tensor, offset: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """x_1 ~ N(0, I), plus per-sample, per-channel offset noise when `offset > 0`."""
    kw = dict(generator=generator, device=x_0.device, dtype=x_0.dtype)
    noise = torch.randn(x_0.shape, **kw)
    if offset > 0:
        noise = noise + offset * torch.randn(x_0.shape[0], 1, x_0.shape[2], **kw)
    return noise


def flow_loss(pred: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over all tokens, or over the tokens selected by the boolean `[N]` mask."""
    err = (pred.float() - target.float()).square()
    return err.mean() if tokens is None else err[:, tokens].mean()


# ----------------------------------------------------------------------------------------------
# Data order that survives a resume


class StepSampler(Sampler[int]):
    """Endless sample positions k = start, start+1, … (every `world`-th one for DDP rank `rank`)."""

    def __init__(self, start: int = 0, rank: int = 0, world: int = 1):
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self):
        k = self.start * self.world + self.rank
        while True:
            yield k
            k += self.world

    def __len__(self) -> int:
        return 2**62


class Positioned(Dataset):
    """Reads sample position k as: epoch k // n, a seeded shuffle of that epoch, and a seeded RNG.

    Everything random about position k (which sample, its flip or crop) is a pure function of
    (seed, k), so a resumed run sees exactly what an uninterrupted one would have.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self._perm = dataset, seed, (None, None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int):
        epoch, i = divmod(k, len(self.dataset))
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1000003 + k)
            return self.dataset[int(self._perm[1][i])]


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
        self._step_started = None
        self._noise_gen: torch.Generator | None = None  # t and x_1 come from here, resumable
        self._noise_state: torch.Tensor | None = None

    def noise_generator(self) -> torch.Generator:
        if self._noise_gen is None:
            self._noise_gen = torch.Generator(self.device).manual_seed(self.cfg.train.seed * 1009 + self.global_rank)
            if self._noise_state is not None:
                self._noise_gen.set_state(self._noise_state)
        return self._noise_gen

    # -- building ------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        cfg = self.cfg
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        # Full training keeps fp32 master weights (autocast does the bf16 maths); LoRA trains
        # fp32 adapters over a frozen base in the model's dtype.
        dtype = torch.float32 if cfg.train.finetune == "full" else None
        model = build_model(cfg, device, dtype)
        if cfg.train.init_from:
            source = find_checkpoint(cfg.train.init_from)
            load_weights(source, model, load_checkpoint_config(source))
            log.info("Initialised from %s", source)
        self.model = prepare_for_training(model, cfg)

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
        g = self.noise_generator()
        t = sample_timesteps(n, cfg.timestep_mean, cfg.timestep_std, cfg.timestep_shift, g)
        noise = sample_noise(enc.x_0.float(), cfg.offset_noise, g)
        if self.global_step < 2 and log.isEnabledFor(logging.DEBUG):
            self._debug_shapes(batch, enc)
        pred, target = model(vis, ir, sem, t, noise, guidance=cfg.guidance, encoded=enc)
        tokens = model.target_tokens(enc) if cfg.loss_region == "target" else None
        loss = flow_loss(pred, target, tokens)
        # Every DDP rank must skip together (a rank that skips its backward would hang the others).
        if self.trainer.strategy.reduce_boolean_decision(not torch.isfinite(loss), all=False):
            self._bad_steps += 1
            log.warning("step %d: loss is %s (%d/%d bad steps in a row); skipping the update",
                        self.global_step, loss.item(), self._bad_steps, cfg.max_bad_steps)
            if self._bad_steps >= cfg.max_bad_steps:
                raise Vis2IRError(
                    f"training stopped at step {self.global_step}: the loss was NaN/inf for {self._bad_steps} "
                    f"steps in a row (train.max_bad_steps); the last good checkpoint is kept under "
                    f"{Path(cfg.output_dir) / 'checkpoints'}; try a lower train.learning_rate")
            return None
        self._bad_steps = 0
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
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._sample_grid(vis[:4], ir[:4], None if sem is None else sem[:4])
        return loss

    @torch.no_grad()
    def _sample_grid(self, vis, ir, sem) -> None:
        """visible | generated | ground truth | semantic, saved under samples/ and sent to TensorBoard."""
        from vis2ir.io.images import is_finite, write_png
        from vis2ir.sample import generate
        from vis2ir.visualize import labelled_grid

        s = self.cfg.sample
        generated = generate(self.model, vis, sem if self.model.mode != "none" else None, steps=s.steps,
                             guidance=s.guidance, seed=s.seed)
        if not is_finite(generated):  # a black grid would look like a result
            log.warning("step %d: the validation samples are not finite (NaN/inf); no samples picture written",
                        self.global_step)
            return
        columns = {"visible": vis, "generated": generated, "truth": ir}
        if sem is not None:
            columns["semantic"] = sem
        grid = labelled_grid(columns)
        path = write_png(Path(self.cfg.train.output_dir) / "samples" / f"step-{self.global_step}.png", grid)
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
        if cfg.optimizer == "prodigy":
            from prodigyopt import Prodigy

            optimizer = Prodigy(groups, lr=cfg.learning_rate, use_bias_correction=True, safeguard_warmup=True,
                                weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:  # one fused pass over all gradients
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))), on_step=True)
        for group in optimizer.param_groups:
            self.log(f"train/lr_{group.get('name', 'group')}", group["lr"], on_step=True)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._step_started is None:
            return
        dt = time.perf_counter() - self._step_started
        n = len(batch["name"]) * self.trainer.world_size
        self.log("train/step_time", dt, on_step=True)
        self.log("train/samples_per_s", n / dt, on_step=True)

    # -- resume state: trainable weights and RNG only (the frozen base is rebuilt from config) -

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["rng"] = {"noise": self.noise_generator().get_state(), "torch": torch.get_rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng", {})
        self._noise_state = rng.get("noise")
        if "torch" in rng:  # dropout and other global draws
            torch.set_rng_state(rng["torch"])


def prepare_for_training(model: Vis2IRModel, cfg: Config) -> Vis2IRModel:
    """LoRA (fp32 adapters on a frozen base) or full training; gradient checkpointing if asked."""
    if cfg.train.finetune == "lora":
        if not getattr(model.transformer, "peft_config", None):  # else LoRA came with `train.init_from`
            add_lora(model.transformer, cfg.model.lora)
        for name, p in model.transformer.named_parameters():
            p.requires_grad_("lora_" in name)
        for p in model.transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        model.transformer.requires_grad_(True)
    if model.adapter is not None:
        model.adapter.float().requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    return model


# ----------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointExport(L.Callback):
    """Writes `checkpoints/step-N/` (weights, config, resume state) atomically; keeps the last K."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir, self.last = cfg, run_dir, -1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.cfg.train.checkpoint_every == 0:
            self.save(trainer, module, step)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_step > 0:
            self.save(trainer, module, trainer.global_step)

    def save(self, trainer, module: Vis2IRModule, step: int) -> None:
        if step == self.last:
            return
        self.last = step
        final = self.run_dir / "checkpoints" / f"step-{step}"
        tmp = final.with_name(f".step-{step}.tmp")
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_weights(tmp, module.model, self.cfg)
        trainer.strategy.barrier()
        trainer.save_checkpoint(tmp / RESUME_FILE, weights_only=False)
        if trainer.is_global_zero:
            replace_dir(tmp, final)
            for old in list_checkpoints(self.run_dir)[:-self.cfg.train.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("Saved checkpoint %s", final)
        trainer.strategy.barrier()


# ----------------------------------------------------------------------------------------------
# Entry point


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
        folder = Path(resume)
        found = [] if (folder / RESUME_FILE).exists() else list_checkpoints(folder)
        folder = found[-1] if found else folder
    state = folder / RESUME_FILE
    if not state.exists():
        raise Vis2IRError(f"--resume {resume}: {state} not found (expected a checkpoint folder or a run folder)")
    return state


def build_trainer(cfg: Config, run_dir: Path, callbacks=(), loggers=True, progress: bool = True) -> L.Trainer:
    t = cfg.train
    cuda = torch.cuda.is_available() and t.accelerator != "cpu"
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if cuda else "32-true")
    strategy = t.strategy
    if strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(find_unused_parameters=False)
    if loggers is True:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        # One version folder per launch, so a resumed run adds its logs beside the first ones.
        loggers = [CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tensorboard")]
    return L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=precision, max_steps=t.max_steps, max_epochs=-1,
        max_time=None if t.max_minutes is None else {"minutes": t.max_minutes},
        accumulate_grad_batches=t.accumulate_grad_batches, gradient_clip_val=t.grad_clip or None,
        log_every_n_steps=t.log_every, val_check_interval=t.val_every * t.accumulate_grad_batches,
        check_val_every_n_epoch=None, limit_val_batches=t.val_batches, num_sanity_val_steps=0,
        default_root_dir=run_dir, callbacks=[CheckpointExport(cfg, run_dir), *callbacks], logger=loggers,
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
        val_set = build_dataset(cfg.data, "val", require_semantic=need)
        return make_loader(val_set, shuffle=False, **kw) if len(val_set) else []
    if cfg.data.latent_cache:
        from vis2ir.latent_cache import LatentCache

        train_set = LatentCache(cfg.data.latent_cache, cfg)
    else:
        train_set = build_dataset(cfg.data, "train", require_semantic=need)
        if cfg.data.source == "thermalscenes" and cfg.data.synth_prerender:
            log.info("Rendering %d training scenes once, in %d processes", len(train_set),
                     max(1, cfg.data.num_workers))
            train_set.prerender(max(1, cfg.data.num_workers))
    per_step = cfg.train.batch_size * cfg.train.accumulate_grad_batches
    sampler = StepSampler(start=start_step * per_step, rank=trainer.global_rank, world=trainer.world_size)
    return make_loader(Positioned(train_set, cfg.train.seed), sampler=sampler, drop_last=True, **kw)


def train(cfg: Config, resume: str | None = None, model: Vis2IRModel | None = None, progress: bool = True,
          callbacks=()) -> Path:
    """Train as `cfg` says; returns the run folder."""
    run_dir = Path(cfg.train.output_dir)
    state = resolve_resume(resume, run_dir)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    # Our data order is resumable by construction (StepSampler + Positioned), which Lightning cannot see.
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention backward crashed on Hopper (DESIGN §9)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    trainer = build_trainer(cfg, run_dir, callbacks=callbacks, progress=progress)
    module = Vis2IRModule(cfg, model, start_step=_resume_step(state) if state else 0)
    log.info("Training %s for %d steps (batch %d × %d accumulation × %d devices) into %s", cfg.model.semantic.mode,
             cfg.train.max_steps, cfg.train.batch_size, cfg.train.accumulate_grad_batches, trainer.world_size, run_dir)
    trainer.fit(module, ckpt_path=state, weights_only=True if state else None)
    return run_dir


def _resume_step(state: Path) -> int:
    name = state.parent.name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    ckpt = torch.load(state, map_location="cpu", weights_only=True)
    return int(ckpt["global_step"])
