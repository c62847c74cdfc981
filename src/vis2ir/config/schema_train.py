"""The `train:` section of the settings: optimisation, checkpoints, logging and hardware. Each field's comment
is its meaning (`vis2ir config show`), its annotation its roles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from vis2ir.config.checks import check, check_seed
from vis2ir.config.roles import MODEL, NO_ROLE, RESUMABLE


@dataclass
class TrainConfig:
    """Optimisation, checkpoints, logging and hardware for `vis2ir train` (docs/design.md §3)."""

    batch_size: Annotated[int, NO_ROLE] = 4  # samples per device and micro-batch (at most the training split's size)
    max_steps: Annotated[int, RESUMABLE] = 1000  # the run's total optimizer steps; a resumed run continues to it
    # time budget of each launch in minutes (null: none); when spent, a checkpoint and the resume command
    max_minutes: Annotated[float | None, RESUMABLE] = None
    # the run folder: checkpoints/, logs/, tensorboard/, samples/, config.yaml
    output_dir: Annotated[str, RESUMABLE] = "runs/vis2ir"
    # lora: LoRA on a frozen transformer; full: every transformer weight trains
    finetune: Annotated[Literal["lora", "full"], MODEL] = "lora"
    # start from a checkpoint's weights: a checkpoint or run folder, or demo (the shipped model)
    init_from: Annotated[str | None, NO_ROLE] = None
    optimizer: Annotated[Literal["adamw", "prodigy"], NO_ROLE] = "adamw"  # adamw or prodigy
    learning_rate: Annotated[float, NO_ROLE] = 1e-4  # learning rate of the transformer (LoRA or full)
    weight_decay: Annotated[float, NO_ROLE] = 0.01  # weight decay of the transformer's trainable weights
    # learning rate of the cross-attention adapter (null: learning_rate)
    adapter_learning_rate: Annotated[float | None, NO_ROLE] = None
    adapter_weight_decay: Annotated[float, NO_ROLE] = 0.0  # weight decay of the adapter
    warmup_steps: Annotated[int, NO_ROLE] = 0  # linear learning-rate warm-up steps
    grad_clip: Annotated[float, NO_ROLE] = 0.5  # gradient norm clipping (0: none)
    accumulate_grad_batches: Annotated[int, NO_ROLE] = 1  # micro-batches per optimizer step
    # recompute activations in the backward pass (less memory, slower): true (every transformer block), false,
    # or auto (only as many blocks as train.memory_budget_gib needs, planned from measured block memory)
    gradient_checkpointing: Annotated[bool | Literal["auto"], RESUMABLE] = False
    # GiB the training step may use with gradient_checkpointing auto (null: the GPU's memory less 5 %)
    memory_budget_gib: Annotated[float | None, RESUMABLE] = None
    # compile the transformer's repeated blocks with torch.compile (faster steps; the first step compiles)
    compile: Annotated[bool, RESUMABLE] = False
    # auto: bf16-mixed on a GPU, 32-true on the CPU; bf16-mixed: fp32 trainable weights under bf16 autocast;
    # bf16-true: bf16 weights, no autocast, AdamW on fp32 master copies; 16-mixed, 32-true: Lightning's
    precision: Annotated[Literal["auto", "bf16-mixed", "bf16-true", "16-mixed", "32-true"], NO_ROLE] = "auto"
    guidance: Annotated[float, NO_ROLE] = 1.0  # guidance value given to the transformer in training
    # all: loss over every token; target: over the infrared panel's tokens only
    loss_region: Annotated[Literal["all", "target"], NO_ROLE] = "all"
    timestep_mean: Annotated[float, NO_ROLE] = 0.0  # mean of the logit-normal flow-time distribution
    timestep_std: Annotated[float, NO_ROLE] = 1.0  # standard deviation of the logit-normal flow-time distribution
    timestep_shift: Annotated[float, NO_ROLE] = 1.0  # shift of the flow times towards noise (> 1) or data (< 1)
    offset_noise: Annotated[float, NO_ROLE] = 0.0  # per-sample, per-channel offset added to the noise
    # per sample, the semantic map replaced by an all-unknown one (VOID, black) with this probability, so that
    # the model also serves partial maps and no map (generate without --semantic on such a model)
    semantic_dropout: Annotated[float, NO_ROLE] = 0.0
    seed: Annotated[int, NO_ROLE] = 0  # seed of the data order, noise and flow times
    accelerator: Annotated[Literal["auto", "cpu", "gpu"], NO_ROLE] = "auto"  # auto: a GPU when there is one; cpu; gpu
    devices: Annotated[int | str, NO_ROLE] = "auto"  # devices per node: a number, auto, or a list like '0,1'
    num_nodes: Annotated[int, NO_ROLE] = 1  # machines (multi-node DDP)
    # auto, ddp (a whole model per device) or fsdp (the frozen base sharded across the devices); deepspeed is refused
    strategy: Annotated[Literal["auto", "ddp", "fsdp", "deepspeed"], NO_ROLE] = "auto"
    checkpoint_every: Annotated[int, RESUMABLE] = 500  # write checkpoints/step-N every this many steps (and at the end)
    keep_last: Annotated[int, RESUMABLE] = 3  # checkpoints kept (the newest ones)
    save_dtype: Annotated[Literal["float32", "bfloat16", "float16"], NO_ROLE] = "float32"  # dtype of the saved weights
    val_every: Annotated[int, RESUMABLE] = 500  # validate every this many steps
    val_batches: Annotated[int, RESUMABLE] = 2  # validation batches per validation (0: no validation)
    log_every: Annotated[int, RESUMABLE] = 10  # log the training scalars every this many steps
    # stop after this many NaN/inf steps in a row (each one's update is skipped)
    max_bad_steps: Annotated[int, RESUMABLE] = 5

    def validate(self) -> None:
        at_least = {"batch_size": 1, "max_steps": 0, "warmup_steps": 0, "accumulate_grad_batches": 1,
                    "num_nodes": 1, "checkpoint_every": 1, "keep_last": 1, "val_every": 1, "val_batches": 0,
                    "log_every": 1, "max_bad_steps": 1}
        for key, low in at_least.items():
            check(getattr(self, key) >= low, f"train.{key}", f"an integer >= {low}", getattr(self, key))
        check_seed(self.seed, "train.seed")
        check(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes",
              "a number of minutes > 0 (or null: no time limit)", self.max_minutes)
        check(self.learning_rate > 0, "train.learning_rate", "a number > 0", self.learning_rate)
        check(self.adapter_learning_rate is None or self.adapter_learning_rate > 0,
              "train.adapter_learning_rate", "a number > 0 (or null: the same as learning_rate)",
              self.adapter_learning_rate)
        for key in ("weight_decay", "adapter_weight_decay", "grad_clip", "offset_noise", "guidance"):
            check(getattr(self, key) >= 0, f"train.{key}", "a number >= 0", getattr(self, key))
        check(0.0 <= self.semantic_dropout < 1.0, "train.semantic_dropout", "a probability from 0 to below 1 (1 "
              "would never show a map: for a model without maps, set model.semantic.mode=none)", self.semantic_dropout)
        for key in ("timestep_std", "timestep_shift"):
            check(getattr(self, key) > 0, f"train.{key}", "a number > 0", getattr(self, key))
        check((isinstance(self.devices, int) and self.devices >= 1) or self.devices == "auto"
              or (isinstance(self.devices, str) and "," in self.devices),
              "train.devices", "a number of devices >= 1, 'auto', or a list like '0,1'", self.devices)
        check(self.memory_budget_gib is None or self.memory_budget_gib > 0, "train.memory_budget_gib",
              "a number of GiB > 0 (or null: the GPU's memory less 5 %)", self.memory_budget_gib)
        check(self.memory_budget_gib is None or self.gradient_checkpointing == "auto", "train.memory_budget_gib",
              "null unless train.gradient_checkpointing is auto (the budget only plans which blocks to checkpoint)",
              self.memory_budget_gib)
        check(self.strategy != "deepspeed", "train.strategy",
              "'auto', 'ddp' or 'fsdp' (DeepSpeed is not supported: train.strategy=fsdp shards the frozen base "
              "across the GPUs, ddp keeps a whole model on each)", self.strategy)
        check(self.strategy != "fsdp" or not self.compile, "train.compile",
              "false with train.strategy=fsdp (compiled blocks under FSDP are not tested yet)", self.compile)
        check(self.strategy != "fsdp" or self.gradient_checkpointing != "auto", "train.gradient_checkpointing",
              "true or false with train.strategy=fsdp (the `auto` plan measures unsharded blocks)",
              self.gradient_checkpointing)
        check(self.strategy != "fsdp" or self.precision != "bf16-true", "train.precision",
              "'auto' or 'bf16-mixed' with train.strategy=fsdp (bf16-true's fp32 master weights are not sharded "
              "with the model yet)", self.precision)
        check(self.strategy != "fsdp" or self.precision != "16-mixed", "train.precision",
              "'auto', 'bf16-mixed' or '32-true' with train.strategy=fsdp (Lightning's FSDP2 "
              "strategy has no fp16 loss scaling)", self.precision)
