"""The optimizer of a run: parameter groups (backbone, adapter), AdamW (fused) or Prodigy, linear warmup,
and the fp32 master weights that `train.precision: bf16-true` updates in place of the bf16 ones."""

from __future__ import annotations

import logging

import torch

from vis2ir.config import TrainConfig

log = logging.getLogger(__name__)


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters of a `Vis2IRModel` as optimizer groups: the backbone's (LoRA or the whole
    transformer) at `learning_rate`, the adapter's (if any) at `adapter_learning_rate`."""
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
    return groups


def build_optimizer(groups: list[dict], cfg: TrainConfig, sharded: bool = False) -> dict:
    """Lightning's `configure_optimizers` answer: the optimizer of `cfg.optimizer` over `groups` and its
    per-step warmup schedule (`sharded`: FSDP's parameters, which the fused AdamW cannot take)."""
    if cfg.optimizer == "prodigy":
        from prodigyopt import Prodigy

        optimizer = Prodigy(groups, lr=cfg.learning_rate, use_bias_correction=True, safeguard_warmup=True,
                            weight_decay=cfg.weight_decay)
    else:
        # fused: one kernel per step, and it skips a step on the device when told (`found_inf`); not under
        # fp16 loss scaling, where Lightning unscales the gradients itself before clipping, nor on FSDP's
        # sharded parameters (a device flag beside DTensors; a bad step there drops its gradients instead)
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                      fused=cfg.precision != "16-mixed" and not sharded)
    warmup = cfg.warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class MasterWeights:
    """With `train.precision: bf16-true` the optimizer updates fp32 master copies of the bf16 weights (a bf16
    weight cannot take an update much smaller than itself); after each step they are copied back. The
    masters are saved in the resume state, so that a resume continues exactly."""

    def __init__(self):
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (bf16 weight, its fp32 master)
        self.loaded: list[torch.Tensor] | None = None  # from a resume state, before the optimizer is made

    def groups(self, groups: list[dict]) -> list[dict]:
        """`groups` with every non-fp32 parameter replaced by its master (the loaded one, if any)."""
        loaded = iter(self.loaded or ())
        out = []
        for group in groups:
            params = []
            for p in group["params"]:
                if p.dtype == torch.float32:
                    params.append(p)
                    continue
                master = next(loaded, None)
                master = (p.detach().float() if master is None else master.to(p.device)).clone()
                self.pairs.append((p, master))
                params.append(master)
            out.append({**group, "params": params})
        self.loaded = None
        return out

    def take_grads(self) -> None:
        """Move the bf16 weights' gradients to their fp32 masters, which the optimizer updates."""
        for p, master in self.pairs:
            master.grad = p.grad.float() if p.grad is not None else None
            p.grad = None

    def copy_back(self) -> None:
        """Copy the updated masters into the bf16 weights (after an optimizer step)."""
        if self.pairs:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in self.pairs], [m for _, m in self.pairs])

    def state(self) -> list[torch.Tensor]:
        """The masters on the CPU, in order, for the resume state."""
        return [m.detach().cpu() for _, m in self.pairs]
