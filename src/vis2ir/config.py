"""Typed settings: dataclasses loaded from YAML, dotted command-line overrides, validation.

Every setting lives in one of the dataclasses below; `load_config` reads a YAML file into them,
applies `key.path=value` overrides and validates. An unknown key names the closest valid one; a bad
value says what is allowed. With no config file, the `XFL_CONFIG` environment variable is used (the
original launch convention).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from vis2ir.errors import Vis2IRError, first_line
from vis2ir import yamltext
from vis2ir.roles import (DATA, LATENT, MODEL, NO_ROLE, RESUMABLE, declared_roles, prefixes, role_name,
                          section_roles)
from vis2ir.files import write_text

log = logging.getLogger(__name__)

ICEDIT_PROMPT = (
    "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly "
    "the same as on the left but "
)
DEFAULT_INSTRUCTION = "seen by a thermal infrared camera, as a grayscale infrared image."

# The panoptic segmenter of `vis2ir segment`, `--semantic auto` and `data.semantic_source: auto`.
DEFAULT_SEGMENTER = "facebook/mask2former-swin-large-coco-panoptic"
# `evaluate --pred-values`: how 16-bit predictions become [0, 1] (`vis2ir.evaluate.run.prediction_reading`)
PRED_VALUES = ("auto", "full-range", "ir-normalize")

# How long `vis2ir app` keeps results and uploads (minutes), so a long-running page does not fill the disk.
APP_KEEP_MINUTES = 60
# The largest photo or semantic map `vis2ir app` accepts from a visitor (MiB): larger uploads are refused.
APP_MAX_UPLOAD_MIB = 25

SemanticMode = Literal["none", "pixel_fusion", "cross_attention", "in_context", "channel_concat"]


class ConfigError(Vis2IRError):
    """A setting is unknown or has a value that is not allowed."""


# Every seed (model.seed, model.text.seed, data.synth_seed, train.seed, sample.seed, and the command-line seeds)
# is in [0, SEED_LIMIT): Lightning's seed_everything (train.seed) and numpy's legacy seeding take 32-bit seeds
# only, torch's generators 64-bit ones; one bound for all of them keeps derived seeds in range too
# (train.seed * 1000003 + position, sample.seed + noise draw: far below 2**63).
SEED_LIMIT = 2**32
SEED_EXPECTED = f"an integer from 0 to {SEED_LIMIT - 1} (2**32 - 1)"


def check_seed(seed: Any, key: str) -> int:
    """`seed` when it is an integer in [0, SEED_LIMIT), else a one-line `ConfigError` naming `key`."""
    _check(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT, key, SEED_EXPECTED,
           seed)
    return seed


@dataclass
class SemanticConfig:
    """How the semantic map conditions the model (docs/design.md §5)."""

    # how the semantic map conditions the model: none, pixel_fusion, cross_attention, in_context, channel_concat
    mode: Annotated[SemanticMode, MODEL, LATENT] = "cross_attention"
    num_layers: Annotated[int, MODEL] = 1  # cross-attention adapter layers
    num_heads: Annotated[int, MODEL] = 8  # attention heads of the adapter (must divide the token width)
    dropout: Annotated[float, NO_ROLE] = 0.0  # dropout inside the adapter's attention
    # rope: the adapter's queries and keys carry 2-D positions; none: they do not
    position: Annotated[Literal["rope", "none"], MODEL] = "rope"
    rope_min_wavelength: Annotated[float, MODEL] = 5.0  # shortest RoPE wavelength of the adapter, in tokens
    rope_max_wavelength: Annotated[float, MODEL] = 80.0  # longest RoPE wavelength of the adapter, in tokens
    # starting value of each adapter layer's residual scale (0: the adapter starts switched off)
    scale_init: Annotated[float, NO_ROLE] = 0.0
    # condition: the adapter acts on the clean visible tokens, measured far better (docs/results.md); noisy: on x_t
    inject_into: Annotated[Literal["noisy", "condition"], MODEL] = "condition"
    # pixel_fusion: weight of the semantic map blended into the visible image
    fusion_alpha: Annotated[float, MODEL, LATENT] = 0.5

    def validate(self) -> None:
        _check(self.num_layers >= 1, "model.semantic.num_layers", "an integer >= 1", self.num_layers)
        _check(self.num_heads >= 1, "model.semantic.num_heads", "an integer >= 1", self.num_heads)
        _check(0.0 <= self.dropout < 1.0, "model.semantic.dropout", "a number in [0, 1)", self.dropout)
        _check(0.0 <= self.fusion_alpha <= 1.0, "model.semantic.fusion_alpha", "a number in [0, 1]",
               self.fusion_alpha)
        _check(0 < self.rope_min_wavelength <= self.rope_max_wavelength,
               "model.semantic.rope_min_wavelength", "0 < rope_min_wavelength <= rope_max_wavelength",
               self.rope_min_wavelength)

    def validate_width(self, width: int) -> None:
        """The adapter splits the transformer's token width `width` into `num_heads` heads (RoPE: of 4k)."""
        if self.mode != "cross_attention":
            return
        _check(width % self.num_heads == 0, "model.semantic.num_heads",
               f"a divisor of the token width {width} (model.transformer.attention_head_dim × num_attention_heads)",
               self.num_heads)
        _check(self.position != "rope" or (width // self.num_heads) % 4 == 0, "model.semantic.num_heads",
               f"a number of heads that leaves a head dimension divisible by 4 for position 'rope' (token width "
               f"{width}), or model.semantic.position=none", self.num_heads)


# ICEdit's LoRA targets (docs/design.md §3): image-stream modules only, no text-stream ones. A regex that
# peft matches against the full module name.
ICEDIT_LORA_TARGETS = (
    r"(x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_q|attn\.to_k|attn\.to_v|attn\.to_out\.0|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_q|attn\.to_k|attn\.to_v))"
)


@dataclass
class LoraConfig:
    """LoRA on the transformer (used when `train.finetune: lora`)."""

    rank: Annotated[int, MODEL] = 32  # LoRA rank: the inner width of each low-rank update
    alpha: Annotated[float, NO_ROLE] = 32.0  # LoRA alpha (the update is scaled by alpha / rank)
    dropout: Annotated[float, NO_ROLE] = 0.0  # dropout on the LoRA branch
    # initialisation of the LoRA weights: gaussian (as ICEdit) or peft's default
    init: Annotated[Literal["gaussian", "default"], NO_ROLE] = "gaussian"
    # regular expression of the transformer modules that get LoRA (ICEdit's image-stream set)
    target_modules: Annotated[str, MODEL] = ICEDIT_LORA_TARGETS

    def validate(self) -> None:
        _check(self.rank >= 1, "model.lora.rank", "an integer >= 1", self.rank)
        _check(self.alpha > 0, "model.lora.alpha", "a number > 0", self.alpha)
        _check(0.0 <= self.dropout < 1.0, "model.lora.dropout", "a number in [0, 1)", self.dropout)


@section_roles(MODEL)  # the transformer's shape: every setting shapes the model
@dataclass
class TransformerConfig:
    """Shape of a transformer built from configuration (`model.backbone: random`).

    The defaults are FLUX.1 Fill's real size; configs for tests and the demo shrink them.
    `in_channels` and `out_channels` are not settings: they follow from the codec and the mode.
    `init: normal` builds the weights empty on the target device and fills them with N(0, 0.02):
    a real-size model in under a second, for speed and memory measurements (docs/design.md §9).
    """

    num_layers: int = 19  # double-stream (MM-DiT) blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128  # width of one attention head
    num_attention_heads: int = 24  # attention heads (token width = attention_head_dim × num_attention_heads)
    joint_attention_dim: int = 4096  # width of the text (T5) embeddings
    pooled_projection_dim: int = 768  # width of the pooled text (CLIP) embedding
    # RoPE dimensions of the (index, row, column) axes; they sum to attention_head_dim
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    guidance_embeds: bool = True  # whether the transformer takes a guidance value (FLUX.1 Fill does)
    # default: the layers' own initialisation; normal: N(0, 0.02), fast, for speed and memory measurements
    init: Literal["default", "normal"] = "default"

    @property
    def width(self) -> int:
        """The token width: attention_head_dim × num_attention_heads (3072 for FLUX.1)."""
        return self.attention_head_dim * self.num_attention_heads

    def validate(self) -> None:
        for key in ("num_layers", "num_single_layers"):
            _check(getattr(self, key) >= 0, f"model.transformer.{key}", "an integer >= 0", getattr(self, key))
        _check(self.num_layers + self.num_single_layers >= 1, "model.transformer.num_layers",
               "at least one block (num_layers + num_single_layers >= 1)", self.num_layers)
        for key in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim"):
            _check(getattr(self, key) >= 1, f"model.transformer.{key}", "an integer >= 1", getattr(self, key))
        _check(all(d >= 2 and d % 2 == 0 for d in self.axes_dims_rope), "model.transformer.axes_dims_rope",
               "three even numbers >= 2", list(self.axes_dims_rope))
        _check(sum(self.axes_dims_rope) == self.attention_head_dim, "model.transformer.axes_dims_rope",
               f"three numbers summing to attention_head_dim={self.attention_head_dim}",
               list(self.axes_dims_rope))


@section_roles(MODEL)  # the random text encoders' weights: every setting shapes the model
@dataclass
class TextConfig:
    """Tiny random text encoders for a random backbone; their widths follow `model.transformer`."""

    num_layers: int = 1  # layers of each tiny random text encoder
    seed: int = 0  # seed of the random text encoders' weights

    def validate(self) -> None:
        _check(self.num_layers >= 1, "model.text.num_layers", "an integer >= 1", self.num_layers)
        check_seed(self.seed, "model.text.seed")


@section_roles(MODEL, LATENT)  # the codec: every setting shapes the model and the latents
@dataclass
class VAEConfig:
    """A tiny `AutoencoderKL` built from configuration (`codec: vae` with `backbone: random`)."""

    block_out_channels: tuple[int, ...] = (16, 16, 16, 16)  # channels of the four encoder/decoder stages
    latent_channels: int = 16  # latent channels
    layers_per_block: int = 1  # ResNet layers per stage
    norm_num_groups: int = 8  # groups of the group norms

    def validate(self) -> None:
        _check(len(self.block_out_channels) == 4, "model.vae.block_out_channels",
               "four numbers (so that the scale factor stays 8)", list(self.block_out_channels))
        _check(self.norm_num_groups >= 1, "model.vae.norm_num_groups", "an integer >= 1", self.norm_num_groups)
        _check(all(c >= 1 and c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "model.vae.block_out_channels", f"numbers >= 1 divisible by norm_num_groups={self.norm_num_groups}",
               list(self.block_out_channels))
        _check(self.latent_channels >= 1, "model.vae.latent_channels", "an integer >= 1", self.latent_channels)
        _check(self.layers_per_block >= 1, "model.vae.layers_per_block", "an integer >= 1", self.layers_per_block)


@dataclass
class ModelConfig:
    """The backbone (FLUX.1 Fill or a model built from configuration) and the semantic mode."""

    # FLUX.1 Fill: Hub id or local folder (diffusers FluxFillPipeline layout)
    flux_path: Annotated[str, LATENT] = "black-forest-labs/FLUX.1-Fill-dev"
    # pretrained: FLUX.1 Fill from flux_path; random: a model built from model.transformer (from scratch)
    backbone: Annotated[Literal["pretrained", "random"], MODEL, LATENT] = "pretrained"
    # vae: FLUX's VAE latents; pixel: an exact pixel codec (random backbone only)
    codec: Annotated[Literal["vae", "pixel"], MODEL, LATENT] = "vae"
    # pixel codec: pixels per token side (a factor × factor × 3 patch per token)
    pixel_factor: Annotated[int, MODEL, LATENT] = 4
    # the fixed instruction the model is conditioned on (its embeddings are computed once and cached)
    prompt: Annotated[str, NO_ROLE] = ICEDIT_PROMPT + DEFAULT_INSTRUCTION
    max_sequence_length: Annotated[int, NO_ROLE] = 512  # T5 tokens of the prompt
    # weights' dtype: auto = bfloat16 on a GPU, float32 on the CPU
    dtype: Annotated[Literal["auto", "bfloat16", "float16", "float32"], NO_ROLE] = "auto"
    # storage of the frozen transformer blocks, none, fp8 or nf4 (LoRA trains on top; docs/performance.md)
    quantize: Annotated[Literal["none", "fp8", "nf4"], NO_ROLE] = "none"
    # where prompt embeddings are cached, so the text encoders load only once
    prompt_cache_dir: Annotated[str, RESUMABLE] = "~/.cache/vis2ir/prompt_embeds"
    seed: Annotated[int, MODEL, LATENT] = 0  # seed of a random backbone's weights
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        _check(self.max_sequence_length >= 1, "model.max_sequence_length", "an integer >= 1",
               self.max_sequence_length)
        _check(self.pixel_factor >= 1, "model.pixel_factor", "an integer >= 1", self.pixel_factor)
        check_seed(self.seed, "model.seed")
        _check(not (self.backbone == "pretrained" and self.codec == "pixel"), "model.codec",
               "'vae' with a pretrained backbone (the pixel codec needs `model.backbone: random`)",
               self.codec)
        self.transformer.validate()
        self.vae.validate()
        self.text.validate()
        self.semantic.validate()
        self.semantic.validate_width(self.transformer.width)
        self.lora.validate()


@dataclass
class DataConfig:
    """Where the triptychs come from and how they are shaped (owned by the data package; docs/data.md).

    `source`: 'thermalscenes' (synthetic, in memory), a folder in a known layout, parquet file(s) or a
    glob, a `datasets` folder or Hub id. `layout` names the layout when detection should not guess.
    `semantic_source: auto` makes missing semantic maps of a folder source with `segment_model` and
    caches them in `<source>/semantic_auto/` (docs/segmentation.md).
    """

    # thermalscenes, a folder in a known layout, parquet file(s) or a glob, a datasets folder or Hub id
    source: Annotated[str, DATA] = "thermalscenes"
    # the folder or table layout; auto: detected from the folder's shape (docs/data.md)
    layout: Annotated[Literal["auto", "table", "triptych", "paired", "llvip", "flir", "m3fd", "msrs", "kaist"],
                      LATENT, DATA] = "auto"
    # panel size in pixels, a multiple of 16: the side of a square panel; with bucket, panels of about size² pixels
    size: Annotated[int, LATENT] = 512
    # bucket: the nearest of shapes of about size² pixels at the image's aspect ratio (one shape per batch);
    # or a square panel: resize (aspect not kept), center_crop, or random_crop (training only)
    resize_policy: Annotated[Literal["bucket", "resize", "center_crop", "random_crop"], LATENT] = "center_crop"
    # bucket: the longest side of a bucket is at most this times its shortest
    max_aspect: Annotated[float, LATENT] = 2.0
    hflip: Annotated[bool, LATENT] = True  # mirror half of the training samples at random (all panels alike)
    visible_column: Annotated[str, LATENT, DATA] = "visible"  # table sources: the visible image's column
    infrared_column: Annotated[str, LATENT, DATA] = "infrared"  # table sources: the infrared image's column
    semantic_column: Annotated[str, LATENT, DATA] = "panoptic_img"  # table sources: the semantic map's column
    # table sources: the column of [visible | infrared | semantic] images
    triptych_column: Annotated[str, LATENT, DATA] = "triptych"
    name_column: Annotated[str, DATA] = "name"  # table sources: the column of sample names (else row numbers)
    # folder sources: the folder of semantic maps, <semantic_dir>/<name>.png
    semantic_dir: Annotated[str, LATENT, DATA] = "semantic"
    # files: maps from semantic_dir; auto: missing ones made by segment_model, cached in semantic_auto/
    semantic_source: Annotated[Literal["files", "auto"], LATENT, DATA] = "files"
    # panoptic segmenter for semantic_source: auto (Hub id or local folder)
    segment_model: Annotated[str, LATENT, DATA] = DEFAULT_SEGMENTER
    # 16-bit / float infrared to [0, 1]: percentile (per image), minmax (per image), fixed (ir_range)
    ir_normalize: Annotated[Literal["percentile", "minmax", "fixed"], LATENT] = "percentile"
    # percentile: the low and high percentiles mapped to 0 and 1
    ir_percentiles: Annotated[tuple[float, float], LATENT] = (1.0, 99.0)
    ir_range: Annotated[tuple[float, float], LATENT] = (0.0, 65535.0)  # fixed: the raw values mapped to 0 and 1
    # share of samples without an official split that go to val (carved from train when none)
    val_fraction: Annotated[float, DATA] = 0.05
    test_fraction: Annotated[float, DATA] = 0.05  # share of samples without an official split that go to test
    # error: stop at the first bad sample; skip: warn and leave it out
    on_bad_sample: Annotated[Literal["error", "skip"], NO_ROLE] = "error"
    synth_count: Annotated[int, DATA] = 1000  # thermalscenes: number of scenes (split by name hash)
    synth_seed: Annotated[int, LATENT, DATA] = 0  # thermalscenes: seed of the scene set
    # thermalscenes: render the training scenes once before the loader workers start
    synth_prerender: Annotated[bool, RESUMABLE] = False
    # a folder made by `vis2ir data cache`: train from its latents, skipping the codec
    latent_cache: Annotated[str | None, NO_ROLE] = None
    num_workers: Annotated[int, RESUMABLE] = 2  # DataLoader worker processes (0: load in the main process)

    def validate(self) -> None:
        _check(self.size >= 16 and self.size % 16 == 0, "data.size", "a multiple of 16", self.size)
        _check(1.0 <= self.max_aspect <= 8.0, "data.max_aspect", "a number from 1 to 8", self.max_aspect)
        _check(self.num_workers >= 0, "data.num_workers", "an integer >= 0", self.num_workers)
        lo, hi = self.ir_percentiles
        _check(0.0 <= lo < hi <= 100.0, "data.ir_percentiles", "two numbers 0 <= low < high <= 100",
               list(self.ir_percentiles))
        _check(self.ir_range[0] < self.ir_range[1], "data.ir_range", "two numbers low < high", list(self.ir_range))
        _check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "a number in [0, 1)", self.val_fraction)
        _check(0.0 <= self.test_fraction < 1.0 - self.val_fraction, "data.test_fraction",
               "a number in [0, 1 - val_fraction)", self.test_fraction)
        _check(self.synth_count >= 1, "data.synth_count", "an integer >= 1", self.synth_count)
        check_seed(self.synth_seed, "data.synth_seed")
        _check(bool(self.segment_model.strip()), "data.segment_model", "a Hub id or a local folder",
               self.segment_model)


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
            _check(getattr(self, key) >= low, f"train.{key}", f"an integer >= {low}", getattr(self, key))
        check_seed(self.seed, "train.seed")
        _check(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes",
               "a number of minutes > 0 (or null: no time limit)", self.max_minutes)
        _check(self.learning_rate > 0, "train.learning_rate", "a number > 0", self.learning_rate)
        _check(self.adapter_learning_rate is None or self.adapter_learning_rate > 0,
               "train.adapter_learning_rate", "a number > 0 (or null: the same as learning_rate)",
               self.adapter_learning_rate)
        for key in ("weight_decay", "adapter_weight_decay", "grad_clip", "offset_noise", "guidance"):
            _check(getattr(self, key) >= 0, f"train.{key}", "a number >= 0", getattr(self, key))
        for key in ("timestep_std", "timestep_shift"):
            _check(getattr(self, key) > 0, f"train.{key}", "a number > 0", getattr(self, key))
        _check((isinstance(self.devices, int) and self.devices >= 1) or self.devices == "auto"
               or (isinstance(self.devices, str) and "," in self.devices),
               "train.devices", "a number of devices >= 1, 'auto', or a list like '0,1'", self.devices)
        _check(self.memory_budget_gib is None or self.memory_budget_gib > 0, "train.memory_budget_gib",
               "a number of GiB > 0 (or null: the GPU's memory less 5 %)", self.memory_budget_gib)
        _check(self.memory_budget_gib is None or self.gradient_checkpointing == "auto", "train.memory_budget_gib",
               "null unless train.gradient_checkpointing is auto (the budget only plans which blocks to checkpoint)",
               self.memory_budget_gib)
        _check(self.strategy != "deepspeed", "train.strategy",
               "'auto', 'ddp' or 'fsdp' (DeepSpeed is not supported: train.strategy=fsdp shards the frozen base "
               "across the GPUs, ddp keeps a whole model on each)", self.strategy)
        _check(self.strategy != "fsdp" or not self.compile, "train.compile",
               "false with train.strategy=fsdp (compiled blocks under FSDP are not tested yet)", self.compile)
        _check(self.strategy != "fsdp" or self.gradient_checkpointing != "auto", "train.gradient_checkpointing",
               "true or false with train.strategy=fsdp (the `auto` plan measures unsharded blocks)",
               self.gradient_checkpointing)
        _check(self.strategy != "fsdp" or self.precision != "bf16-true", "train.precision",
               "'auto' or 'bf16-mixed' with train.strategy=fsdp (bf16-true's fp32 master weights are not sharded "
               "with the model yet)", self.precision)
        _check(self.strategy != "fsdp" or self.precision != "16-mixed", "train.precision",
               "'auto', 'bf16-mixed' or '32-true' with train.strategy=fsdp (Lightning's FSDP2 "
               "strategy has no fp16 loss scaling)", self.precision)


@section_roles(RESUMABLE)  # sampling (the validation grids of a run): may change on resume
@dataclass
class SampleConfig:
    """Sampling settings (docs/design.md §1)."""

    steps: int = 28  # denoising steps
    guidance: float = 50.0  # guidance value given to the transformer (FLUX.1 Fill: 30-50; the demo model: 1)
    seed: int = 0  # seed of each image's noise
    adapter_scale: float = 1.0  # the cross-attention adapter's residual: 1 as trained, 0 off (what it adds)
    # Longer side images are generated at: `auto` = a checkpoint's data.size (trained with resize_policy bucket:
    # the input's aspect-ratio bucket; a config-built model: the input's own size), `native` or 0 = the input's
    # own size, or a number of pixels.
    size: int | Literal["auto", "native"] = "auto"
    # diffusers' tiled VAE encode/decode: less memory for large images (a VAE codec only; docs/performance.md)
    vae_tiling: bool = False
    # torch.compile the transformer's repeated blocks (regional compilation): the first image compiles (slow)
    compile: bool = False
    # torch.compile mode: default, or max-autotune-no-cudagraphs (a longer compile; measured no faster on an H200).
    # The modes with CUDA graphs (reduce-overhead, max-autotune) are refused: one graph serves every block in turn,
    # so each block's call would overwrite the previous block's output.
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    # Merge a checkpoint's LoRA into the base weights, fuse each attention's q/k/v projections into one
    # (diffusers' fuse_lora and fuse_projections, layer by layer) and put each MLP's tanh GELU inside its input
    # product (cuBLASLt's GELU epilogue on CUDA) when a pipeline loads a model: the same images within rounding,
    # fewer and larger kernels (docs/performance.md). Not for a quantized base (model.quantize), whose weights
    # stay as they are.
    fuse: bool = True
    # reuse the transformer's work across steps (approximate): none; first_block (diffusers' First-Block-Cache:
    # skip the other blocks while the first block's residual changes less than cache_threshold); taylorseer
    # (diffusers' TaylorSeer, lite: compute every cache_interval-th step, extrapolate the output in between)
    cache: Literal["none", "first_block", "taylorseer"] = "none"
    cache_threshold: float = 0.05  # first_block: relative change of the first block's residual that recomputes
    cache_interval: int = 5  # taylorseer: one computed step every cache_interval steps after the warm-up
    cache_warmup: int = 3  # taylorseer: the first steps always computed
    cache_order: int = 1  # taylorseer: order of the Taylor extrapolation

    def replaced(self, **changes) -> SampleConfig:
        """A validated copy with the settings in `changes` that are not None (one call's steps, seed, ...);
        a bad one is a one-line `ConfigError` naming it (`sample.seed: expected ...`)."""
        copy = dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
        copy.validate()
        return copy

    def validate(self) -> None:
        _check(self.steps >= 1, "sample.steps", "an integer >= 1", self.steps)
        _check(self.guidance >= 0, "sample.guidance", "a number >= 0", self.guidance)
        check_seed(self.seed, "sample.seed")
        _check(not isinstance(self.size, int) or self.size >= 0, "sample.size", "auto, native or pixels >= 0",
               self.size)
        _check(math.isfinite(self.adapter_scale), "sample.adapter_scale", "a finite number", self.adapter_scale)
        _check(math.isfinite(self.cache_threshold) and self.cache_threshold >= 0, "sample.cache_threshold",
               "a number >= 0", self.cache_threshold)
        _check(self.cache_interval >= 1, "sample.cache_interval", "an integer >= 1", self.cache_interval)
        _check(self.cache_warmup >= 1, "sample.cache_warmup", "an integer >= 1", self.cache_warmup)
        _check(self.cache_order >= 1, "sample.cache_order", "an integer >= 1", self.cache_order)


@section_roles(RESUMABLE)  # evaluation: no part of a training run, may change on resume
@dataclass
class EvalConfig:
    """`vis2ir evaluate` and `vis2ir ablate` (docs/evaluation.md).

    `fid_weights` / `lpips_weights`: the Inception (`pt_inception-2015-12-05-6726825d.pth`) and
    AlexNet (`alexnet-owt-7be5be79.pth`) weights, a file or a folder holding it (else
    $VIS2IR_FID_WEIGHTS / $VIS2IR_LPIPS_WEIGHTS, else the torch hub cache). A pixel is "hot" above
    the truth image's `hot_percentile`-th percentile. `limit`: test images scored (null: all);
    `fit_limit`: training samples the reference predictors are fitted on. `noise_draws`: a checkpoint
    is sampled with `sample.seed`, `sample.seed + 1`, … and scored over all draws (every image shares
    one draw, so one draw's luck moves the mean PSNR by ~0.5 dB; docs/results.md).
    """

    # Inception weights for FID: a file or a folder holding it (null: $VIS2IR_FID_WEIGHTS, torch hub cache)
    fid_weights: str | None = None
    # AlexNet weights for LPIPS: a file or a folder (null: $VIS2IR_LPIPS_WEIGHTS, torch hub cache)
    lpips_weights: str | None = None
    hot_percentile: float = 90.0  # a pixel is hot above this percentile of its truth image (hallucinated-heat metric)
    batch_size: int = 8  # images per batch when generating for evaluation
    limit: int | None = None  # test images scored (null: all)
    fit_limit: int = 400  # training samples the reference predictors are fitted on
    noise_draws: int = 1  # draws of noise per image (seeds sample.seed, +1, ...), scored over all

    def validate(self) -> None:
        _check(0.0 < self.hot_percentile < 100.0, "eval.hot_percentile", "a number in (0, 100)",
               self.hot_percentile)
        _check(self.batch_size >= 1, "eval.batch_size", "an integer >= 1", self.batch_size)
        _check(self.limit is None or self.limit >= 1, "eval.limit", "an integer >= 1 (or null: all)", self.limit)
        _check(self.fit_limit >= 1, "eval.fit_limit", "an integer >= 1", self.fit_limit)
        _check(self.noise_draws >= 1, "eval.noise_draws", "an integer >= 1", self.noise_draws)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        for key, value in self.flat().items():  # NaN passes no range check but fails every comparison
            for v in value if isinstance(value, list) else [value]:
                _check(not isinstance(v, float) or math.isfinite(v), key, "a finite number", value)
        for part in (self.model, self.data, self.train, self.sample, self.eval):
            part.validate()
        _check(self.sample.seed + self.eval.noise_draws <= SEED_LIMIT, "eval.noise_draws",
               f"at most {SEED_LIMIT} - sample.seed (the draws use seeds sample.seed, sample.seed + 1, ...)",
               self.eval.noise_draws)
        _check(self.train.strategy != "fsdp" or self.model.quantize == "none", "model.quantize",
               "none with train.strategy=fsdp (a quantized base cannot be sharded: train.strategy=ddp trains on "
               "it, or fsdp shards a bf16 base with model.quantize=none)", self.model.quantize)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Every setting by its dotted key (`model.semantic.mode`), values as plain YAML types."""
        return _flatten(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write the config as YAML, atomically."""
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# Roles (`vis2ir.roles`): declared beside each setting's type above


def setting_roles() -> dict[str, frozenset[str]]:
    """Every setting's roles ('model', 'latent', 'resumable', 'data') by dotted key, as declared in the schema."""
    return declared_roles(Config)


def keys_with_role(role: str) -> tuple[str, ...]:
    """The dotted keys of the settings with `role` ('model', 'latent', 'resumable' or 'data'), in schema order;
    `ValueError` for another role."""
    name = role_name(role)
    return tuple(k for k, r in setting_roles().items() if name in r)


def role_prefixes(role: str) -> tuple[str, ...]:
    """`keys_with_role(role)` for `str.startswith`, a section whose settings all have the role as one prefix
    (`sample.`): short enough to list in a message."""
    return prefixes(setting_roles(), role)


# ----------------------------------------------------------------------------------------------
# Meanings: `vis2ir config show`


def setting_meanings() -> dict[str, str]:
    """Every setting's one-line meaning by dotted key, and each section's (`model.semantic`): the comment
    beside or above its field in this file, or the section class's docstring's first line. The comments
    are the one source of truth; a test checks that every setting has one."""
    import ast
    import io
    import tokenize

    source = Path(__file__).read_text(encoding="utf-8")
    lines = source.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}

    def meaning(node: ast.AnnAssign) -> str:
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        beside = comments.get(node.end_lineno) if not lines[node.end_lineno - 1].lstrip().startswith("#") else None
        return " ".join([*above, *([beside] if beside else [])])

    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        nodes = {n.target.id: n for n in classes[cls.__name__].body
                 if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out[prefix + f.name] = (hints[f.name].__doc__ or "").strip().splitlines()[0]
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = meaning(nodes[f.name])

    walk(Config, "")
    return out


def describe_settings(cfg: Config) -> str:
    """`cfg` as commented YAML: every setting with its value and its meaning (`setting_meanings`). The text
    is a valid config file: saved, it loads back to `cfg`."""
    meanings = setting_meanings()

    def inline(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True) \
            .removesuffix("\n").removesuffix("\n...")

    def section(d: dict, prefix: str, indent: str) -> list[str]:
        rows = []
        for key, value in d.items():
            text = meanings.get(prefix + key, "")
            if isinstance(value, dict):
                rows.append(f"{indent}{key}:{'  # ' + text if text else ''}")
                rows += section(value, f"{prefix}{key}.", indent + "  ")
            else:
                rows.append(f"{indent}{key}: {inline(value)}" + (f"  # {text}" if text else ""))
        return rows

    return "\n".join(section(cfg.to_dict(), "", "")) + "\n"


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Config | None = None) -> Config:
    """Read `path` (or `$XFL_CONFIG`, or the defaults), apply `key.path=value` overrides, validate.

    With `base` (a resumed run's settings), the file's settings and the overrides go over `base`
    instead of over the defaults.
    """
    return from_dict(Config, _raw_settings(path, overrides, base)).validate()


def check_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Check the keys and value types of a config file and overrides, without the range checks that
    depend on the base a command puts them over (a checkpoint's or a resumed run's settings). Cheap and
    torch-free: commands call it before importing torch, so a typo is answered at once."""
    from_dict(Config, _raw_settings(path, overrides))


def _raw_settings(path: str | Path | None, overrides, base: Config | None = None) -> dict[str, Any]:
    """The nested settings of `path` (or `$XFL_CONFIG`) over `base`, with the overrides put in."""
    if path is None:
        path = os.environ.get("XFL_CONFIG") or None
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        texts = yamltext.Texts()
        raw = read_yaml(path, texts) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, data, train, sample, eval)")
        _replace_retired(raw, path)
        _settle_texts(lambda: yamltext.with_texts(Config, raw, texts, _accepts), path)
    if base is not None:
        raw = _merge(base.to_dict(), raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value, e.g. model.semantic.num_heads=16")
        value, text = yamltext.scalar(value)
        tp = yamltext.type_at(Config, key.strip())
        if text is not None and tp is not None:
            value = _settle_texts(lambda: yamltext.as_setting(tp, value, text, _accepts, key.strip()), None)
        _set_dotted(raw, key.strip(), value)
    return raw


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a setting of type `tp` takes `value` as it is."""
    try:
        _coerce(tp, value, "")
    except ConfigError:
        return False
    return True


def _settle_texts(settle, path: Path | None) -> Any:
    """`settle()` (`vis2ir.yamltext`'s choice of a plain scalar's number or text), its refusal a `ConfigError`."""
    try:
        return settle()
    except yamltext.AmbiguousNumber as err:
        raise ConfigError(f"{path}: {err}" if path else f"override {err}") from None


# Values an older vis2ir accepted, and saved in run and checkpoint configs, that this one refuses:
# (section, key, old values, replacement, why). In a file they are replaced with a warning, so old runs and
# checkpoints still load; typed as an override they are refused like any other bad value.
RETIRED = [("sample", "compile_mode", ("reduce-overhead", "max-autotune"), "default",
            "its CUDA graphs overwrote one block's output with the next block's under regional compilation")]
_warned: set[tuple[str, str]] = set()


def _replace_retired(raw: dict, path: Path) -> None:
    """Replace, in the settings read from `path`, the values listed in `RETIRED` (a warning once per file)."""
    for section, key, old, new, why in RETIRED:
        settings = raw.get(section)
        if isinstance(settings, dict) and settings.get(key) in old:
            if (str(path), key) not in _warned:
                _warned.add((str(path), key))
                log.warning("%s: %s.%s=%s is no longer offered (%s); using %s", path, section, key, settings[key],
                            why, new)
            settings[key] = new


def read_yaml(path: str | Path, texts: yamltext.Texts | None = None) -> Any:
    """The YAML document in file `path`. A syntax error is a one-line `ConfigError` that starts
    `FILE:LINE:COLUMN:` (1-based, as editors count) and says what the parser expected; a key given twice in
    one mapping is one too (`FILE:LINE: key 'x' given twice (first at line N)`). With `texts`, the source
    text of the plain scalars YAML read as non-strings is put in it (`vis2ir.yamltext.Texts`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({first_line(err)})") from None
    try:
        data, found = yamltext.load(text)
    except yamltext.DuplicateKey as err:
        raise ConfigError(f"{path}:{err.line}: {err}; keep one of them") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        context = f" ({err.context})" if err.context else ""
        raise ConfigError(f"{where}: not valid YAML: {err.problem or first_line(err)}{context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({first_line(err)})") from None
    if texts is not None:
        texts.update(found)
    return data


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, checking keys and value types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(filter(None, [where, close[0]]))!r}?" if close else ""
            raise ConfigError(f"unknown setting {dotted!r}{hint} (valid here: {', '.join(names)})")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _describe(tp: Any) -> str | None:
    """What a value of a simple type looks like, for messages; None for other types."""
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return {bool: "true or false", int: "an integer", float: "a number"}.get(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner:
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                last = err
        described = [_describe(option) for option in inner]
        if len(inner) > 1 and all(described):  # e.g. bool | Literal["auto"]: "true, false or 'auto'"
            raise ConfigError(f"{where}: expected {' or '.join(described)}, got {value!r}")
        raise last
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _merge(old: dict, new: dict) -> dict:
    """`old` with `new`'s values put in, section by section."""
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def first_difference(old: dict[str, Any], new: dict[str, Any], prefixes: tuple[str, ...]):
    """The first dotted key under `prefixes` whose value differs, as `(key, old, new)`, or None."""
    for key in sorted(old):
        if key.startswith(prefixes) and old[key] != new.get(key):
            return key, old[key], new.get(key)
    return None


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
