"""The model made ready to train as the settings say: LoRA or full, precision, gradient checkpointing,
compiled blocks; and what that needs to know of one sample (its tokens) and of the precision."""

from __future__ import annotations

import torch

from vis2ir.checkpoint import add_lora
from vis2ir.config import Config
from vis2ir.model import Vis2IRModel


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
                                  image_tokens, text_tokens,
                                  optimizer_states=4 if cfg.train.optimizer == "prodigy" else 2,
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
    """(image tokens, text tokens) of one training sample: the canvas of `data.size` panels (Fill) or the target
    and the reference (Kontext), the prompt."""
    from vis2ir.latents import token_grid

    rows, cols = token_grid(model.codec, cfg.data.size, cfg.data.size * model.spec.sequence_panels(model.mode))
    return rows * cols, model.prompt_embeds.shape[1]
