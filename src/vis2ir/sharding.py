"""`train.strategy: fsdp`: the frozen base sharded across the GPUs with PyTorch's FSDP2 (docs/design.md §12).

Each double and single FLUX block, then the transformer, is a `fully_shard` unit on a one-dimensional
device mesh of every rank; a block's bf16 base weights and fp32 LoRA weights shard side by side (FSDP2
keeps each parameter's own dtype). The cross-attention adapter (16,897 parameters a layer, with a
scalar scale that `fully_shard` refuses) and the frozen codec stay whole on every rank; the adapter's
gradients are averaged across the ranks like DDP's (`average_replicated_grads`).

Lightning's `ModelParallelStrategy` runs it; `ShardedStrategy` makes its resume state the single-device
one (`resume.ckpt`: the trainable weights whole, the optimizer state keyed by position), so a
checkpoint's files are the same whichever strategy wrote them.
"""

from __future__ import annotations

import logging
import warnings

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from vis2ir.errors import Vis2IRError
from vis2ir.quantize import blocks

log = logging.getLogger(__name__)


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of `module` is an FSDP2 shard (a DTensor)."""
    DTensor = _dtensor()
    return any(isinstance(p, DTensor) for p in module.parameters())


def require_fsdp2() -> None:
    """Fail in one line when this torch has no public FSDP2 (`torch.distributed.fsdp.fully_shard`, torch ≥ 2.6)."""
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "fully_shard") or not hasattr(torch.nn.utils, "get_total_norm"):
        raise Vis2IRError(f"train.strategy=fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch "
                          f"{torch.__version__}: upgrade torch, or set train.strategy=ddp")


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """Shard `model.transformer` (a `Vis2IRModel`'s) over `mesh` in place: one FSDP2 unit per block, and
    the transformer as the root unit (embedders, norms, output projection). Returns `model`."""
    from torch.distributed.fsdp import fully_shard

    transformer = model.transformer
    units = blocks(transformer)
    for block in units:
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)
    # diffusers' blocks return views of their output (a split of the joint stream); FSDP2 warns that an
    # in-place op on such a view would skip its hooks. FluxTransformer2DModel never changes them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    log.info("FSDP: the transformer is sharded over %d ranks in %d units (%d blocks + the root)",
             mesh.size(), len(units) + 1, len(units))
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: its shard for a DTensor, `t` itself otherwise."""
    return t.to_local() if isinstance(t, _dtensor()) else t


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together (e.g. gradients), the same on every rank: sharded tensors
    (DTensors) count once in full, whole ones as they are. A 0-dim float32 tensor."""
    DTensor = _dtensor()
    parts = []
    for group in ([t for t in tensors if isinstance(t, DTensor)], [t for t in tensors if not isinstance(t, DTensor)]):
        if group:
            norm = torch.nn.utils.get_total_norm(group)
            parts.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float())
    if not parts:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([p.to(parts[0].device) for p in parts]))


def clip_grads(params: list[nn.Parameter], max_norm: float, norm: torch.Tensor) -> None:
    """Scale the gradients of `params` so that their total norm `norm` (from `total_norm`) is at most `max_norm`."""
    DTensor = _dtensor()
    for group in ([p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]):
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm.to(local(group[0]).device))


def average_replicated_grads(params: list[nn.Parameter], strategy) -> None:
    """Average the gradients of the whole (unsharded) `params` across the ranks, in one collective: under
    FSDP2 only the sharded ones are reduced by FSDP. A no-op for sharded parameters and without gradients."""
    DTensor = _dtensor()
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p, DTensor)]
    if not grads or strategy.world_size == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = strategy.reduce(_flatten_dense_tensors(grads), reduce_op="mean")
    for g, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(averaged)


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Whole CPU copies of the trainable parameters of `module` and of its persistent buffers, by name,
    gathered from the shards under FSDP. In a distributed run every rank must call it (a collective when
    sharded): rank 0 gets the tensors, the others may get an empty dict. In one process: the tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))


def _positional(state: dict, order: list[str]) -> dict:
    """An optimizer state keyed by parameter name → keyed by position, as `Optimizer.state_dict()` writes it."""
    ids = {name: i for i, name in enumerate(order)}
    return {"state": {ids[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [ids[k] for k in g["params"]]} for g in state["param_groups"]]}


def _named(state: dict, order: list[str]) -> dict:
    """The inverse of `_positional`."""
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def _param_order(module: nn.Module, optimizer) -> list[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every rank (a one-dimensional mesh), with the single-device resume state.

    The module shards itself in `configure_model` (`shard_model` on `device_mesh["data_parallel"]`).
    Saving gathers the trainable weights and the optimizer state whole on rank 0 (frozen weights are
    never gathered: they are rebuilt from the config); loading gives every rank its shards of them.
    """

    def __init__(self):
        require_fsdp2()
        super().__init__(save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict:
        return trainable_state(self.model)

    def optimizer_state(self, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
        full = get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _positional(full, _param_order(self.model, optimizer)) if self.global_rank == 0 else {}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Every rank reads the resume state and takes its shards of the weights and the optimizer state."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        # Always weights_only: a resume state holds tensors and plain values only (never run pickled code).
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, checkpoint["state_dict"], options=full)
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            set_optimizer_state_dict(self.model, optimizer, _named(state, _param_order(self.model, optimizer)),
                                     options=full)
        return checkpoint
