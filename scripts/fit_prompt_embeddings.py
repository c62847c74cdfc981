"""Re-fit a checkpoint's constant prompt embeddings, with every other weight frozen.

Checkpoints of random-backbone models written before `prompt_embeds.safetensors` was saved with
them depend on embeddings from tiny random text encoders, which differ between library versions:
loaded elsewhere, such a model sees a different constant conditioning. This fits those few numbers
(T5 sequence and CLIP pooled embedding) by the flow-matching loss on training scenes, and writes
them into the checkpoint folder.

    python scripts/fit_prompt_embeddings.py CHECKPOINT_DIR [--steps 300 --batch 16 --lr 0.03]
"""

from __future__ import annotations

import argparse
import logging

import torch
from safetensors.torch import save_file

from vis2ir.checkpoint import PROMPT_FILE, find_checkpoint, load_model
from vis2ir.data import build_dataset, collate
from vis2ir.semantic.modes import NEEDS_SEMANTIC
from vis2ir.train import Positioned, flow_loss, sample_noise, sample_timesteps


def validation_loss(model, batch, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    sem = batch.get("semantic")
    enc = model.encode(batch["visible"], batch["infrared"], sem)
    losses = []
    with torch.no_grad():
        for t in (0.25, 0.5, 0.75):
            noise = torch.randn(enc.x_0.shape, generator=g)
            pred, target = model(batch["visible"], batch["infrared"], sem, torch.full((len(noise),), t), noise,
                                 encoded=enc)
            losses.append(flow_loss(pred, target).item())
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    directory = find_checkpoint(args.checkpoint)
    model, cfg = load_model(directory)
    need = cfg.model.semantic.mode in NEEDS_SEMANTIC
    train_set = Positioned(build_dataset(cfg.data, "train", require_semantic=need), args.seed)
    val_set = build_dataset(cfg.data, "val", require_semantic=need)
    val = collate([val_set[i] for i in range(min(32, len(val_set)))])
    print(f"validation loss before: {validation_loss(model, val):.4f}", flush=True)

    model.requires_grad_(False)
    embeds = model.prompt_embeds.clone().requires_grad_(True)
    pooled = model.pooled_prompt_embeds.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embeds, pooled], lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        batch = collate([train_set[step * args.batch + i] for i in range(args.batch)])
        model.prompt_embeds, model.pooled_prompt_embeds = embeds, pooled
        sem = batch.get("semantic")
        enc = model.encode(batch["visible"], batch["infrared"], sem)
        t = sample_timesteps(args.batch, generator=g)
        pred, target = model(batch["visible"], batch["infrared"], sem, t, sample_noise(enc.x_0, 0.0, g), encoded=enc)
        loss = flow_loss(pred, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        model.prompt_embeds, model.pooled_prompt_embeds = embeds.detach(), pooled.detach()
    print(f"validation loss after: {validation_loss(model, val):.4f}", flush=True)
    save_file({"prompt_embeds": embeds.detach().contiguous(), "pooled_prompt_embeds": pooled.detach().contiguous()},
              str(directory / PROMPT_FILE))
    print(f"wrote {directory / PROMPT_FILE}")


if __name__ == "__main__":
    main()
