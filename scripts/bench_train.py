"""Training speed and memory at real size, through `vis2ir train`'s own code path.

Runs N training steps with `vis2ir.train.train` (Lightning, data loader, VAE encodes, adapter,
LoRA, optimizer) and, in the same process on the same model, N bare transformer forward+backward
passes at the same batch and sequence length. Prints both, their ratio and the peak memory, and
where the difference goes: the time of `Vis2IRModel.encode` on a training batch (the codec's
share), with the VAE in its default memory format and in channels-last.

    python scripts/bench_train.py --config configs/bench_realsize.yaml [key=value ...]

Needs a GPU for meaningful figures (the config builds the 12-billion-parameter transformer);
`--config configs/demo.yaml` runs it small on a CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import lightning as L
import torch

from vis2ir.config import load_config
from vis2ir.train import train


class StepClock(L.Callback):
    """Wall time between consecutive optimizer steps (data waits included), and peak memory."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.last, self.module, self.peak = warmup, [], None, None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self.last is not None and trainer.global_step > self.warmup:
            self.times.append(now - self.last)
        if trainer.global_step == self.warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.last = now
        self.module = module

    def on_train_end(self, trainer, module):
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()


def timed(fn, steps: int, warmup: int, device: torch.device) -> list[float]:
    """Wall times of `steps` calls of `fn` after `warmup` untimed ones, the GPU synchronised around each."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def bare_steps(module, cfg, steps: int, warmup: int) -> list[float]:
    """Forward+backward of the transformer alone on random inputs of the training shapes."""
    model = module.model
    transformer = model.transformer
    device = next(transformer.parameters()).device
    b = cfg.train.batch_size
    size = cfg.data.size
    from vis2ir.latents import patch_size, token_width

    p = patch_size(model.codec)
    n = (size // p) * (2 * size // p) * (3 if model.mode == "in_context" else 2) // 2
    hidden = torch.randn(b, n, transformer.config.in_channels, device=device, dtype=transformer.dtype)
    kwargs = dict(
        timestep=torch.full((b,), 0.5, device=device), guidance=torch.full((b,), 1.0, device=device),
        pooled_projections=model.pooled_prompt_embeds.expand(b, -1),
        encoder_hidden_states=model.prompt_embeds.expand(b, -1, -1),
        txt_ids=torch.zeros(model.prompt_embeds.shape[1], 3, device=device),
        img_ids=torch.zeros(n, 3, device=device), return_dict=False,
    )
    assert hidden.shape[-1] - 2 * token_width(model.codec) > 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                       enabled=False)
    transformer.train()

    def step():
        with autocast:
            out = transformer(hidden_states=hidden, **kwargs)[0]
        out.float().square().mean().backward()

    times = timed(step, steps, warmup, device)
    transformer.zero_grad(set_to_none=True)
    return times


def encode_times(module, cfg, steps: int, warmup: int) -> dict[str, float]:
    """Median time of `model.encode` on one training batch, as trained and with a channels-last VAE."""
    from vis2ir.data import build_dataset, collate
    from vis2ir.latents import VAECodec

    model = module.model
    device = model.prompt_embeds.device
    data = build_dataset(cfg.data, "train", require_semantic=model.mode != "none")
    batch = collate([data[i] for i in range(cfg.train.batch_size)])
    images = [batch[k].to(device) if k in batch else None for k in ("visible", "infrared", "semantic")]

    def median_time() -> float:
        return statistics.median(timed(lambda: model.encode(*images), steps, warmup, device))

    out = {"as trained": median_time()}
    if isinstance(model.codec, VAECodec):
        model.codec.vae.to(memory_format=torch.channels_last)
        out["channels-last VAE"] = median_time()
        model.codec.vae.to(memory_format=torch.contiguous_format)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/bench_realsize.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    cfg = load_config(args.config, [f"train.max_steps={args.steps + args.warmup}", *args.overrides])
    clock = StepClock(args.warmup)
    train(cfg, callbacks=[clock], progress=False)
    step = statistics.median(clock.times)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"vis2ir train step times (s): {' '.join(f'{t:.3f}' for t in clock.times)}", flush=True)
    if torch.cuda.is_available():
        clock.module.model.to("cuda")  # Lightning's teardown moved the module to the CPU
    bare = statistics.median(bare_steps(clock.module, cfg, args.steps, args.warmup))
    encode = {} if cfg.data.latent_cache else encode_times(clock.module, cfg, 10, 2)
    print(f"device: {device}")
    print(f"config: {args.config} {' '.join(args.overrides)}")
    print(f"batch {cfg.train.batch_size}, panels {cfg.data.size}x{cfg.data.size}, mode {cfg.model.semantic.mode}, "
          f"gradient checkpointing {cfg.train.gradient_checkpointing}")
    print(f"vis2ir train step (median of {len(clock.times)}): {step:.3f} s  ({cfg.train.batch_size / step:.2f} samples/s)")
    print(f"bare transformer fwd+bwd (median of {args.steps}): {bare:.3f} s")
    print(f"ratio: {step / bare:.3f}  (target <= 1.10)")
    for name, seconds in encode.items():
        print(f"model.encode of one batch, {name} (median of 10): {seconds:.3f} s")
    if cfg.data.latent_cache:
        print(f"latents from the cache {cfg.data.latent_cache}: no codec in the step")
    if clock.peak:
        print(f"peak GPU memory during training steps: {clock.peak / 2**30:.1f} GiB  (target <= 40 GB)")


if __name__ == "__main__":
    main()
