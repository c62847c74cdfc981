"""The `model:` section of the settings: the backbone, its shape when built from configuration, the semantic
adapter and LoRA. Each field's comment is its meaning (`vis2ir config show`), its annotation its roles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from vis2ir.config.checks import check, check_seed
from vis2ir.config.roles import LATENT, MODEL, NO_ROLE, RESUMABLE, section_roles

ICEDIT_PROMPT = (
    "A diptych with two side-by-side images of the same scene. On the right, the scene is exactly "
    "the same as on the left but "
)
FLUX_FILL_ID = "black-forest-labs/FLUX.1-Fill-dev"
FLUX_KONTEXT_ID = "black-forest-labs/FLUX.1-Kontext-dev"
FLUX2_KLEIN_ID = "black-forest-labs/FLUX.2-klein-base-4B"
DEFAULT_INSTRUCTION = "seen by a thermal infrared camera, as a grayscale infrared image."

SemanticMode = Literal["none", "pixel_fusion", "cross_attention", "in_context", "channel_concat"]


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
        check(self.num_layers >= 1, "model.semantic.num_layers", "an integer >= 1", self.num_layers)
        check(self.num_heads >= 1, "model.semantic.num_heads", "an integer >= 1", self.num_heads)
        check(0.0 <= self.dropout < 1.0, "model.semantic.dropout", "a number in [0, 1)", self.dropout)
        check(0.0 <= self.fusion_alpha <= 1.0, "model.semantic.fusion_alpha", "a number in [0, 1]",
              self.fusion_alpha)
        check(0 < self.rope_min_wavelength <= self.rope_max_wavelength,
              "model.semantic.rope_min_wavelength", "0 < rope_min_wavelength <= rope_max_wavelength",
              self.rope_min_wavelength)

    def validate_width(self, width: int) -> None:
        """The adapter splits the transformer's token width `width` into `num_heads` heads (RoPE: of 4k)."""
        if self.mode != "cross_attention":
            return
        check(width % self.num_heads == 0, "model.semantic.num_heads",
              f"a divisor of the token width {width} (model.transformer.attention_head_dim × num_attention_heads)",
              self.num_heads)
        check(self.position != "rope" or (width // self.num_heads) % 4 == 0, "model.semantic.num_heads",
              f"a number of heads that leaves a head dimension divisible by 4 for position 'rope' (token width "
              f"{width}), or model.semantic.position=none", self.num_heads)


# ICEdit's LoRA targets (docs/design.md §3): image-stream modules only, no text-stream ones. A regex that
# peft matches against the full module name.
ICEDIT_LORA_TARGETS = (
    r"(x_embedder"
    r"|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_q|attn\.to_k|attn\.to_v|attn\.to_out\.0|ff\.net\.2)"
    r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_q|attn\.to_k|attn\.to_v))"
)
# diffusers examples/dreambooth/train_dreambooth_lora_flux2_klein.py, its default without --lora_layers: the double
# blocks' image-stream attention and the single blocks' fused input and output projections.
KLEIN_LORA_TARGETS = (
    r"(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))"
)
# channel_concat widens the x_embedder with zero columns for the map: a LoRA there is what learns to read it
KLEIN_CONCAT_LORA_TARGETS = r"(x_embedder|" + KLEIN_LORA_TARGETS[1:]


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
        check(self.rank >= 1, "model.lora.rank", "an integer >= 1", self.rank)
        check(self.alpha > 0, "model.lora.alpha", "a number > 0", self.alpha)
        check(0.0 <= self.dropout < 1.0, "model.lora.dropout", "a number in [0, 1)", self.dropout)


@section_roles(MODEL)  # the transformer's shape: every setting shapes the model
@dataclass
class TransformerConfig:
    """Shape of a transformer built from configuration (`model.weights: random`).

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
    # RoPE dimensions of the (index, row, column) axes (flux2-klein: (index, row, column, text position));
    # they sum to attention_head_dim
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    guidance_embeds: bool = True  # whether the transformer takes a guidance value (FLUX.1 Fill does)
    # default: the layers' own initialisation; normal: N(0, 0.02), fast, for speed and memory measurements
    init: Literal["default", "normal"] = "default"

    @property
    def width(self) -> int:
        """The token width: attention_head_dim × num_attention_heads (3072 for FLUX.1)."""
        return self.attention_head_dim * self.num_attention_heads

    def validate(self, axes: int | None = 3, backbone: str = "flux1-fill") -> None:
        """The shape's checks; `axes` RoPE axes (FLUX.1: 3, FLUX.2: 4; None: any number, a pretrained klein's
        shape comes from its folder) for `backbone`."""
        for key in ("num_layers", "num_single_layers"):
            check(getattr(self, key) >= 0, f"model.transformer.{key}", "an integer >= 0", getattr(self, key))
        check(self.num_layers + self.num_single_layers >= 1, "model.transformer.num_layers",
              "at least one block (num_layers + num_single_layers >= 1)", self.num_layers)
        for key in ("attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim"):
            check(getattr(self, key) >= 1, f"model.transformer.{key}", "an integer >= 1", getattr(self, key))
        count = {3: "three", 4: "four", None: "some"}[axes]
        check(len(self.axes_dims_rope) == (axes or len(self.axes_dims_rope))
              and all(d >= 2 and d % 2 == 0 for d in self.axes_dims_rope),
              "model.transformer.axes_dims_rope", f"{count} even numbers >= 2"
              + ("" if axes == 3 else f" with model.backbone={backbone}"), list(self.axes_dims_rope))
        check(sum(self.axes_dims_rope) == self.attention_head_dim, "model.transformer.axes_dims_rope",
              f"{count} numbers summing to attention_head_dim={self.attention_head_dim}",
              list(self.axes_dims_rope))


@section_roles(MODEL)  # the random text encoders' weights: every setting shapes the model
@dataclass
class TextConfig:
    """Tiny random text encoders for a random backbone; their widths follow `model.transformer`."""

    num_layers: int = 1  # layers of each tiny random text encoder
    seed: int = 0  # seed of the random text encoders' weights

    def validate(self) -> None:
        check(self.num_layers >= 1, "model.text.num_layers", "an integer >= 1", self.num_layers)
        check_seed(self.seed, "model.text.seed")


@section_roles(MODEL, LATENT)  # the codec: every setting shapes the model and the latents
@dataclass
class VAEConfig:
    """A tiny `AutoencoderKL` built from configuration (`codec: vae` with `weights: random`)."""

    block_out_channels: tuple[int, ...] = (16, 16, 16, 16)  # channels of the four encoder/decoder stages
    latent_channels: int = 16  # latent channels
    layers_per_block: int = 1  # ResNet layers per stage
    norm_num_groups: int = 8  # groups of the group norms

    def validate(self) -> None:
        check(len(self.block_out_channels) == 4, "model.vae.block_out_channels",
              "four numbers (so that the scale factor stays 8)", list(self.block_out_channels))
        check(self.norm_num_groups >= 1, "model.vae.norm_num_groups", "an integer >= 1", self.norm_num_groups)
        check(all(c >= 1 and c % self.norm_num_groups == 0 for c in self.block_out_channels),
              "model.vae.block_out_channels", f"numbers >= 1 divisible by norm_num_groups={self.norm_num_groups}",
              list(self.block_out_channels))
        check(self.latent_channels >= 1, "model.vae.latent_channels", "an integer >= 1", self.latent_channels)
        check(self.layers_per_block >= 1, "model.vae.layers_per_block", "an integer >= 1", self.layers_per_block)


@dataclass
class ModelConfig:
    """The backbone (FLUX.1 Fill or Kontext, FLUX.2 klein; pretrained or built from configuration) and the semantic
    mode."""

    # the backbone's weights: Hub id or local folder (diffusers FluxFillPipeline / FluxKontextPipeline /
    # Flux2KleinPipeline layout)
    flux_path: Annotated[str, LATENT] = FLUX_FILL_ID
    # the base model: flux1-fill (FLUX.1 Fill, the photo beside a blank panel), flux1-kontext (FLUX.1 Kontext,
    # the photo as a reference image), flux2-klein (FLUX.2 klein, the photo as a reference image; vis2ir.backbones)
    backbone: Annotated[Literal["flux1-fill", "flux1-kontext", "flux2-klein"], MODEL, LATENT] = "flux1-fill"
    # pretrained: the backbone's weights from flux_path; random: a model built from model.transformer (from scratch)
    weights: Annotated[Literal["pretrained", "random"], MODEL, LATENT] = "pretrained"
    # vae: FLUX's VAE latents; pixel: an exact pixel codec (model.weights: random only)
    codec: Annotated[Literal["vae", "pixel"], MODEL, LATENT] = "vae"
    # pixel codec: pixels per token side (a factor × factor × 3 patch per token)
    pixel_factor: Annotated[int, MODEL, LATENT] = 4
    # the fixed instruction the model is conditioned on (its embeddings are computed once and cached)
    prompt: Annotated[str, NO_ROLE] = ICEDIT_PROMPT + DEFAULT_INSTRUCTION
    max_sequence_length: Annotated[int, NO_ROLE] = 512  # T5 tokens of the prompt
    # weights' dtype: auto = bfloat16 on a GPU, float32 on the CPU
    dtype: Annotated[Literal["auto", "bfloat16", "float16", "float32"], NO_ROLE] = "auto"
    # storage of the frozen transformer blocks, none, fp8 or nf4 (LoRA trains on top; docs/performance.md).
    # fp8 multiplies in float8 where the GPU can (compute capability >= 8.9), elsewhere it upcasts each weight
    quantize: Annotated[Literal["none", "fp8", "nf4"], NO_ROLE] = "none"
    # where prompt embeddings are cached, so the text encoders load only once
    prompt_cache_dir: Annotated[str, RESUMABLE] = "~/.cache/vis2ir/prompt_embeds"
    seed: Annotated[int, MODEL, LATENT] = 0  # seed of the weights with model.weights: random
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        check(self.max_sequence_length >= 1, "model.max_sequence_length", "an integer >= 1",
              self.max_sequence_length)
        check(self.pixel_factor >= 1, "model.pixel_factor", "an integer >= 1", self.pixel_factor)
        check_seed(self.seed, "model.seed")
        check(not (self.weights == "pretrained" and self.codec == "pixel"), "model.codec",
              "'vae' with pretrained weights (the pixel codec needs `model.weights: random`)",
              self.codec)
        self._check_kontext()
        self._check_klein()
        # a klein built from configuration has four RoPE axes (pretrained: the weights folder says)
        klein = self.backbone == "flux2-klein"
        self.transformer.validate((4 if self.weights == "random" else None) if klein else 3, self.backbone)
        self.vae.validate()
        self.text.validate()
        self.semantic.validate()
        self.semantic.validate_width(self.transformer.width)
        self.lora.validate()

    def _check_kontext(self) -> None:
        """What FLUX.1 Kontext does not support yet, refused in one line each (vis2ir.backbones)."""
        if self.backbone != "flux1-kontext":
            return
        check(self.semantic.mode in ("none", "pixel_fusion", "channel_concat"), "model.semantic.mode",
              "none, pixel_fusion or channel_concat with model.backbone=flux1-kontext (its other semantic modes "
              "are not yet supported)", self.semantic.mode)
        check(not (self.weights == "pretrained" and self.flux_path == FLUX_FILL_ID), "model.flux_path",
              f"FLUX.1 Kontext weights with model.backbone=flux1-kontext, e.g. {FLUX_KONTEXT_ID} "
              f"(not {FLUX_FILL_ID}, FLUX.1 Fill's)", self.flux_path)

    def _check_klein(self) -> None:
        """What FLUX.2 klein does not support yet, or needs, refused in one line each; its default LoRA targets
        (`KLEIN_LORA_TARGETS`, with channel_concat `KLEIN_CONCAT_LORA_TARGETS`) replace ICEdit's,
        which name no module of its single blocks."""
        if self.backbone != "flux2-klein":
            return
        name = "with model.backbone=flux2-klein"
        check(self.semantic.mode in ("none", "pixel_fusion", "channel_concat"), "model.semantic.mode",
              f"none, pixel_fusion or channel_concat {name} (its other semantic modes are not yet supported)",
              self.semantic.mode)
        check(self.codec == "vae", "model.codec", f"vae {name} (FLUX.2's VAE; the pixel codec is not yet supported)",
              self.codec)
        check(not (self.weights == "pretrained" and self.flux_path in (FLUX_FILL_ID, FLUX_KONTEXT_ID)),
              "model.flux_path", f"FLUX.2 klein weights {name}, e.g. {FLUX2_KLEIN_ID} (not a FLUX.1 model)",
              self.flux_path)
        t = self.transformer
        if self.weights == "random":  # the shape of a klein built from configuration
            check(t.joint_attention_dim % 3 == 0, "model.transformer.joint_attention_dim",
                  f"a multiple of 3 {name} (three Qwen3 layers' hidden states per token)", t.joint_attention_dim)
            check(not t.guidance_embeds, "model.transformer.guidance_embeds",
                  f"false {name} (klein has no guidance embedding; guidance > 1 runs true CFG)", t.guidance_embeds)
        if self.lora.target_modules == ICEDIT_LORA_TARGETS:  # with channel_concat, the widened x_embedder too
            concat = self.semantic.mode == "channel_concat"
            self.lora.target_modules = KLEIN_CONCAT_LORA_TARGETS if concat else KLEIN_LORA_TARGETS
