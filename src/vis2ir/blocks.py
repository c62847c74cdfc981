"""The transformer's repeated blocks in training: gradient checkpointing by memory budget, and compilation.

`train.gradient_checkpointing: auto` checkpoints only as many blocks as a memory budget
(`train.memory_budget_gib`) needs. The plan comes from a measured model of the training step's memory:

    peak ≈ fixed + Σ_blocks (kept_i if block i is checkpointed else full_i)

- `full_i`: the bytes block i saves for its backward (measured once at start: one forward of one block of
  each kind at the training batch and sequence, counting the tensors autograd saves, frozen weights excluded);
- `kept_i`: what a checkpointed block keeps instead (its two inputs, image and text streams);
- `fixed`: every parameter, the trainable weights' gradients and optimizer state, the activations outside
  the blocks (embedders, output projection: four hidden-sized tensors, an estimate) and the backward's working
  memory (twice the largest block's `full_i`: one recomputed block and its gradients).

Blocks with the most bytes to save go first (every FLUX block, double or single, costs about the same
12·d² FLOPs per token, so fewest blocks recomputed = least time lost). Figures are allocator bytes
(`torch.cuda.max_memory_allocated`); the CUDA context and allocator cache come on top.

`train.compile` compiles each repeated block (`speedup.compile_blocks`, shared with `sample.compile`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from vis2ir.errors import Vis2IRError
from vis2ir.latents import parameter_dtype
from vis2ir.quantize import blocks

log = logging.getLogger(__name__)

GiB = 2**30


def checkpoint_plan(full: Sequence[int], kept: Sequence[int], fixed: int, budget: int) -> list[bool]:
    """Which blocks to checkpoint so that `fixed + Σ (kept[i] if checkpointed else full[i]) ≤ budget`.

    Bytes in, one flag per block out: as few blocks as possible, those that save the most first (ties: the
    earlier block). Raises `Vis2IRError` naming `train.memory_budget_gib` when even checkpointing every block
    does not fit.
    """
    need = fixed + sum(full) - budget
    plan = [False] * len(full)
    for i in sorted(range(len(full)), key=lambda i: (-(full[i] - kept[i]), i)):
        if need <= 0:
            break
        if full[i] > kept[i]:
            plan[i] = True
            need -= full[i] - kept[i]
    if need > 0:
        least = fixed + sum(min(f, k) for f, k in zip(full, kept))
        raise Vis2IRError(
            f"train.memory_budget_gib={budget / GiB:g}: even with every transformer block checkpointed, training "
            f"needs about {least / GiB:.1f} GiB (weights, gradients and optimizer state {fixed / GiB:.1f} GiB); set "
            f"train.memory_budget_gib to at least {least / GiB:.1f}, or lower train.batch_size or data.size, or "
            f"quantize the frozen base (model.quantize=fp8|nf4)")
    return plan


def saved_bytes(fn, *args, exclude: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while `fn(*args)` runs (those of `exclude` not counted)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return sum(seen.values())


def block_inputs(transformer, batch: int, image_tokens: int, text_tokens: int):
    """Random inputs of one transformer block at the training shapes: (hidden, encoder hidden, temb, RoPE)."""
    p = next(transformer.parameters())
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    kw = dict(device=p.device, dtype=parameter_dtype(transformer))
    hidden = torch.randn(batch, image_tokens, width, **kw, requires_grad=True)
    text = torch.randn(batch, text_tokens, width, **kw, requires_grad=True)
    temb = torch.randn(batch, width, **kw)
    ids = torch.zeros(text_tokens + image_tokens, 3, device=p.device)
    with torch.no_grad():
        rope = transformer.pos_embed(ids)
    return hidden, text, temb, rope


def measure_blocks(transformer, batch: int, image_tokens: int, text_tokens: int,
                   autocast: torch.dtype | None = None) -> tuple[list[int], list[int]]:
    """`(full, kept)` bytes of every block (see the module's docstring), from one eager forward of one block per
    kind, under the run's autocast dtype (`autocast`: bf16 for bf16-mixed, fp16 for 16-mixed, None: none)."""
    weights = list(transformer.parameters())  # never counted: they are not activations
    hidden, text, temb, rope = block_inputs(transformer, batch, image_tokens, text_tokens)
    kept = hidden.nbytes + text.nbytes
    device = hidden.device.type
    full, per_kind = [], {}
    for block in blocks(transformer):
        kind = type(block).__name__
        if kind not in per_kind:
            # The eager forward (before `train.compile` replaces it), so that every hook sees what autograd saves.
            forward = getattr(block, "_vis2ir_eager_forward", block.forward)
            with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
                per_kind[kind] = saved_bytes(lambda: forward(hidden, text, temb, rope), exclude=weights)
        full.append(per_kind[kind])
    return full, [kept] * len(full)


def fixed_bytes(model: torch.nn.Module, optimizer_states: int, batch: int, tokens: int, width: int,
                full: Sequence[int]) -> int:
    """`fixed` of `checkpoint_plan`: parameters, gradients + optimizer state of the trainable ones (fp32 master
    copy when they are not fp32, `optimizer_states` fp32 tensors each), outside-block activations, backward."""
    total = 0
    for p in model.parameters():
        total += p.nbytes
        if p.requires_grad:
            total += p.nbytes + p.numel() * 4 * (optimizer_states + (p.dtype != torch.float32))
    dtype_size = 2 if next(model.parameters()).dtype != torch.float32 else 4
    return total + 4 * batch * tokens * width * dtype_size + 2 * max(full, default=0)


def set_checkpointing(transformer, plan: Sequence[bool]) -> None:
    """Checkpoint the blocks whose flag is set (diffusers calls our function for every block)."""
    chosen = {id(b) for b, on in zip(blocks(transformer), plan) if on}

    def checkpoint(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
    transformer._vis2ir_plan = list(plan)  # read by scripts/bench_train.py


def describe_plan(plan: Sequence[bool], transformer) -> str:
    """'double 0-18, single 0-3': the checkpointed blocks, by kind and index range."""
    parts = []
    for kind, group in (("double", transformer.transformer_blocks), ("single", transformer.single_transformer_blocks)):
        offset = 0 if kind == "double" else len(transformer.transformer_blocks)
        on = [i for i in range(len(group)) if plan[offset + i]]
        if on:
            runs, start = [], on[0]
            for a, b in zip(on, on[1:] + [None]):
                if b != a + 1:
                    runs.append(f"{start}" if start == a else f"{start}-{a}")
                    start = b
            parts.append(f"{kind} {', '.join(runs)}")
    return "; ".join(parts) or "none"


def plan_checkpointing(transformer, model: torch.nn.Module, budget_gib: float | None, batch: int,
                       image_tokens: int, text_tokens: int, optimizer_states: int = 2,
                       autocast: torch.dtype | None = None) -> list[bool]:
    """Measure the blocks, plan for the budget (null: the card's memory less 5 %, none on the CPU), apply, log."""
    device = next(transformer.parameters()).device
    if budget_gib is None:
        if device.type != "cuda":
            log.info("Gradient checkpointing auto on %s without train.memory_budget_gib: no block checkpointed",
                     device)
            set_checkpointing(transformer, [False] * len(blocks(transformer)))
            return [False] * len(blocks(transformer))
        budget_gib = 0.95 * torch.cuda.get_device_properties(device).total_memory / GiB
    full, kept = measure_blocks(transformer, batch, image_tokens, text_tokens, autocast)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    fixed = fixed_bytes(model, optimizer_states, batch, image_tokens + text_tokens, width, full)
    plan = checkpoint_plan(full, kept, fixed, int(budget_gib * GiB))
    peak = fixed + sum(k if on else f for f, k, on in zip(full, kept, plan))
    log.info("Gradient checkpointing %d of %d blocks to fit %.1f GiB (estimated peak %.1f GiB: fixed %.1f, "
             "blocks %.2f GiB each unless checkpointed, %.2f if): %s", sum(plan), len(plan), budget_gib, peak / GiB,
             fixed / GiB, max(full) / GiB, kept[0] / GiB if kept else 0, describe_plan(plan, transformer))
    set_checkpointing(transformer, plan)
    return plan
