"""The backbone: FLUX.1 Fill's, Kontext's or FLUX.2 klein's transformer, codec and prompt embeddings, or tiny ones
from config.

`load_backbone(cfg)` is the one entry point. With `model.weights: pretrained` it reads
`model.flux_path` (a Hub id, with the user's token, or a local folder in diffusers
`FluxFillPipeline` / `FluxKontextPipeline` / `Flux2KleinPipeline` layout, as `model.backbone` says:
`vis2ir.backbones`). With `model.weights: random` it builds every part from the config with random weights, so
tests, CI and the demo run with nothing downloaded (docs/design.md §6). What differs between FLUX.1 and FLUX.2
(the classes, the text encoders, how the prompt is encoded) is one `Parts` entry per family in `PARTS`.

The prompt is fixed, so its embeddings are a constant: they are computed once, cached on disk
(keyed by model, prompt and maximum length) and the text encoders are dropped (docs/design.md §2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vis2ir import klein
from vis2ir.backbones import SPECS, BackboneSpec
from vis2ir.config import ModelConfig
from vis2ir.errors import Vis2IRError, describe
from vis2ir.files import atomic_write
from vis2ir.hub import cached_snapshot, check_hub, is_local, local_folder
from vis2ir.latents import Codec, PixelCodec, VAECodec, token_width
from vis2ir.quantize import quantize_transformer, require

log = logging.getLogger(__name__)

FLUX_FILL_ID = SPECS["flux1-fill"].hub_id
# Files the project reads from a FluxFillPipeline folder; text parts only when embeddings are not cached.
CORE_FILES = ("transformer/config.json", "vae/config.json")
TEXT_FILES = ("text_encoder/config.json", "text_encoder_2/config.json", "tokenizer", "tokenizer_2")
WEIGHT_FOLDERS = ("transformer", "vae")  # each must hold its weights, not only its config
TEXT_WEIGHT_FOLDERS = ("text_encoder", "text_encoder_2")


@dataclass
class PromptEmbeds:
    """FLUX.1: T5 sequence embeddings `[1, L, D]` and the CLIP pooled embedding `[1, P]` (its text ids are
    zeros). FLUX.2 klein: Qwen3's `[1, L, 3·D']`, a pooled embedding of width 0 `[1, 0]`, and the empty prompt's
    embeddings `[1, L, 3·D']` (true CFG's negative)."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> PromptEmbeds:
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return PromptEmbeds(move(self.prompt_embeds), move(self.pooled_prompt_embeds),
                            move(self.negative_prompt_embeds))

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> PromptEmbeds:
        """From a prompt cache's tensors (FLUX.2's has no pooled embedding: width 0)."""
        embeds = tensors["prompt_embeds"]
        pooled = tensors.get("pooled_prompt_embeds", embeds.new_zeros(embeds.shape[0], 0))
        return cls(embeds, pooled, tensors.get("negative_prompt_embeds"))


@dataclass
class Backbone:
    transformer: torch.nn.Module
    codec: Codec
    prompt: PromptEmbeds
    spec: BackboneSpec = SPECS["flux1-fill"]  # which base model (vis2ir.backbones)
    distilled: bool = False  # a step-distilled checkpoint (klein's `model_index.json`): guidance is ignored


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto` is bf16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, name)


def base_in_channels(codec: Codec) -> int:
    """FLUX Fill's input width for a codec: noisy latents + masked-image latents + mask."""
    return SPECS["flux1-fill"].in_channels(codec)


def load_backbone(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Backbone:
    """Build transformer, codec and prompt embeddings as `cfg` says, on `device` in `dtype`.

    The transformer reaches `device` block by block, quantized on the way when `model.quantize`
    says so (`quantize.py`), so a quantized real-size model never sits whole in bf16 on the GPU.
    """
    require(cfg.quantize)  # a missing library is one line before anything heavy is loaded
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    spec = SPECS[cfg.backbone]
    parts = PARTS[spec.family]
    fill, distilled = None, False
    if cfg.weights == "pretrained":
        root = resolve_flux_path(cfg.flux_path, need_text=not _cache_file(cfg).exists(), spec=spec)
        log.info("Loading %s from %s", spec.title, root)
        _check_class(root, spec, parts, cfg.flux_path)
        codec = parts.pretrained_codec(root, dtype)
        _check_layout(root, spec, codec, cfg.flux_path)
        transformer = parts.pretrained_transformer(root, dtype)
        prompt = prompt_embeddings(cfg, lambda: parts.pretrained_text(root))
        distilled = klein.is_distilled(root)
    else:
        with torch.random.fork_rng(devices=[]):  # seeded build that leaves the global RNG alone
            torch.manual_seed(cfg.seed)
            codec = _random_codec(cfg, dtype)  # first, so that `load_codec` builds the same one
            transformer = _random_transformer(cfg, codec, dtype, spec)
        fill = _fill_normal if cfg.transformer.init == "normal" else None
        prompt = prompt_embeddings(cfg, lambda: parts.tiny_text(cfg))
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # `init: normal` fills the weights here: seeded, global RNG left alone
        transformer = quantize_transformer(transformer, cfg.quantize, device, fill)
    return Backbone(transformer, _to_device(codec, device), prompt.to(device, dtype), spec, distilled)


def _check_class(root: Path, spec: BackboneSpec, parts: Parts, flux_path: str) -> None:
    """Refuse (one line) a weights folder whose transformer is of another class than `spec`'s (a FLUX.1 folder
    for FLUX.2 klein, or the reverse), before its VAE is read with the wrong class."""
    config = root / "transformer" / "config.json"
    try:
        got = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as err:
        raise Vis2IRError(f"{config}: not a readable transformer config.json ({describe(err)})") from None
    if got is not None and got != parts.transformer_class:
        raise Vis2IRError(f"model.flux_path={flux_path!r}: its transformer is a {got}, but model.backbone={spec.name} "
                          f"takes a {parts.transformer_class}; point model.flux_path at {spec.title} weights "
                          f"({spec.hub_id})")


def _check_layout(root: Path, spec: BackboneSpec, codec: Codec, flux_path: str) -> None:
    """Refuse (one line) a weights folder whose transformer takes another input width than `spec`'s, e.g. a
    FLUX.1 Fill folder (384 inputs) for FLUX.1 Kontext (64): diffusers would load it and fail later."""
    got = json.loads((root / "transformer" / "config.json").read_text()).get("in_channels")
    expected = spec.in_channels(codec)
    if got != expected:
        others = [s.title for s in SPECS.values() if s.in_channels(codec) == got]
        raise Vis2IRError(f"model.flux_path={flux_path!r}: its transformer takes {got} input channels "
                          f"({' or '.join(others) or 'no backbone vis2ir knows'}), but model.backbone={spec.name} "
                          f"takes {expected}; point model.flux_path at {spec.title} weights ({spec.hub_id})")


def load_codec(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> Codec:
    """The codec alone (e.g. to cache a data set's latents), the same one `load_backbone` builds."""
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    if cfg.weights == "pretrained":
        spec = SPECS[cfg.backbone]
        root = resolve_flux_path(cfg.flux_path, need_text=False, spec=spec)
        return _to_device(PARTS[spec.family].pretrained_codec(root, dtype), device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _to_device(_random_codec(cfg, dtype), device)


def _pretrained_codec(root: Path, dtype: torch.dtype) -> VAECodec:
    from diffusers import AutoencoderKL

    return VAECodec(AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype))


def _pretrained_transformer(root: Path, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)


def _random_codec(cfg: ModelConfig, dtype: torch.dtype) -> Codec:
    if cfg.codec == "pixel":
        return PixelCodec(cfg.pixel_factor)
    parts = PARTS[SPECS[cfg.backbone].family]
    return parts.codec(_cast(parts.random_vae(cfg), dtype))


def _random_transformer(cfg: ModelConfig, codec: Codec, dtype, spec: BackboneSpec = SPECS["flux1-fill"]):
    """A transformer of the configured shape for `codec` and the backbone `spec`, with random weights (or, with
    `init: normal`, empty weights that `_fill_normal` fills once they are on the device)."""
    width = token_width(codec)
    build = PARTS[spec.family].build_transformer
    if cfg.transformer.init == "normal":
        return build_transformer_empty(cfg, spec.in_channels(codec), width, dtype, build)
    return _cast(build(cfg, spec.in_channels(codec), width), dtype)


def _to_device(codec: Codec, device) -> Codec:
    if isinstance(codec, VAECodec):
        codec.vae.to(device).requires_grad_(False).eval()
    return codec


# ----------------------------------------------------------------------------------------------
# Models built from configuration


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module if dtype == torch.float32 else module.to(dtype)


def build_transformer(cfg: ModelConfig, in_channels: int, out_channels: int):
    """A `FluxTransformer2DModel` of the configured shape with random weights."""
    from diffusers import FluxTransformer2DModel

    t = cfg.transformer
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=t.num_layers,
        num_single_layers=t.num_single_layers, attention_head_dim=t.attention_head_dim,
        num_attention_heads=t.num_attention_heads, joint_attention_dim=t.joint_attention_dim,
        pooled_projection_dim=t.pooled_projection_dim, guidance_embeds=t.guidance_embeds,
        axes_dims_rope=tuple(t.axes_dims_rope),
    )


def build_transformer_empty(cfg: ModelConfig, in_channels: int, out_channels: int, dtype, build=None):
    """The same transformer (`build`: FLUX.1's `build_transformer` by default) with empty (meta) weights in
    `dtype`: a real-size one in under a second, for speed and memory measurements. `_fill_normal` gives each
    part N(0, 0.02) on its device."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return (build or build_transformer)(cfg, in_channels, out_channels).to(dtype)


@torch.no_grad()
def _fill_normal(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.normal_(0, 0.02)


def build_tiny_vae(cfg: ModelConfig):
    """An `AutoencoderKL` with FLUX's layout (4 blocks → factor 8, 16 channels, shift and scale)."""
    from diffusers import AutoencoderKL

    v = cfg.vae
    n = len(v.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(v.block_out_channels),
        layers_per_block=v.layers_per_block, latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups,
        shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False,
    )


def build_tiny_text_encoders(cfg: ModelConfig) -> dict:
    """Tiny random CLIP-L and T5 stand-ins with character-level tokenizers built in code."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ".,'-():;!?")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    clip_tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    t5_tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)

    # Widths follow the transformer: CLIP's pooled output feeds `pooled_projection_dim`,
    # T5's sequence feeds `joint_attention_dim`.
    t, tr = cfg.text, cfg.transformer
    with torch.random.fork_rng(devices=[]):  # seeded, leaving the global RNG alone
        torch.manual_seed(t.seed)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=tr.pooled_projection_dim, intermediate_size=2 * tr.pooled_projection_dim,
            num_hidden_layers=t.num_layers, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=tr.joint_attention_dim, d_kv=8, d_ff=2 * tr.joint_attention_dim,
            num_layers=t.num_layers, num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
    return {"text_encoder": clip.eval(), "tokenizer": clip_tok, "text_encoder_2": t5.eval(), "tokenizer_2": t5_tok}


# ----------------------------------------------------------------------------------------------
# Prompt embeddings


def prompt_embeddings(cfg: ModelConfig, load_encoders) -> PromptEmbeds:
    """The prompt's embeddings from the disk cache, or computed once with `load_encoders()` and cached."""
    path = _cache_file(cfg)
    if path.exists():
        log.info("Prompt embeddings from cache %s", path)
        return PromptEmbeds.of(load_file(path))
    encoders = load_encoders()
    tensors = PARTS[SPECS[cfg.backbone].family].encode_prompt(encoders, cfg.prompt, cfg.max_sequence_length)
    del encoders  # the text encoders are not needed again
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    log.info("Prompt embeddings cached at %s", path)
    return PromptEmbeds.of(tensors)


def _flux1_prompt_tensors(encoders: dict, prompt: str, max_sequence_length: int) -> dict[str, torch.Tensor]:
    embeds = encode_prompt(encoders, prompt, max_sequence_length)
    return {"prompt_embeds": embeds.prompt_embeds, "pooled_prompt_embeds": embeds.pooled_prompt_embeds}


@torch.no_grad()
def encode_prompt(encoders: dict, prompt: str, max_sequence_length: int) -> PromptEmbeds:
    """Encode with diffusers' own `FluxFillPipeline.encode_prompt`, so results match stock diffusers."""
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline(scheduler=None, vae=None, transformer=None, **encoders)
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device="cpu",
                                           max_sequence_length=max_sequence_length)
    return PromptEmbeds(embeds.float().cpu(), pooled.float().cpu())


def _cache_file(cfg: ModelConfig) -> Path:
    source = cfg.flux_path if cfg.weights == "pretrained" else json.dumps(
        {"random": True, "text": vars(cfg.text), "transformer": [cfg.transformer.joint_attention_dim,
                                                                cfg.transformer.pooled_projection_dim]},
        sort_keys=True)
    family = SPECS[cfg.backbone].family
    # FLUX.1's keys as they were; another family's name its family
    parts = [source, cfg.prompt, cfg.max_sequence_length] + ([] if family == "flux1" else [family])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    return Path(cfg.prompt_cache_dir).expanduser() / f"{key}.safetensors"


def _load_text_encoders(root: Path) -> dict:
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    log.info("Encoding the prompt once with CLIP and T5 (cached afterwards)")
    return {
        "text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        "text_encoder_2": T5EncoderModel.from_pretrained(root, subfolder="text_encoder_2", torch_dtype=torch.bfloat16),
        "tokenizer_2": T5TokenizerFast.from_pretrained(root, subfolder="tokenizer_2"),
    }


# ----------------------------------------------------------------------------------------------
# Finding the weights


def _missing_weights(path: str, reason: str, spec: BackboneSpec = SPECS["flux1-fill"]) -> Vis2IRError:
    access = (f"gated under the {spec.licence}: accept it at https://huggingface.co/{spec.hub_id}, then "
              "`hf auth login` or set HF_TOKEN" if spec.gated else f"under the {spec.licence} (see its model card)")
    return Vis2IRError(
        f"cannot load {spec.title} from model.flux_path={path!r}: {reason}. The weights are "
        f"{spec.hub_id} on the Hugging Face Hub, {access}; "
        f"or download a copy and set model.flux_path=/path/to/{spec.hub_id.split('/')[-1]} "
        f"(diffusers {spec.pipeline} layout)"
    )


def resolve_flux_path(path: str, need_text: bool = True, spec: BackboneSpec = SPECS["flux1-fill"]) -> Path:
    """A local folder holding the files we need, from a local path or the Hub (downloading once).

    Fails within seconds, with one message, when the weights cannot be had: no retry loop.
    """
    parts = PARTS[spec.family]
    needed = CORE_FILES + (parts.text_files if need_text else ())
    weights = WEIGHT_FOLDERS + (parts.text_weight_folders if need_text else ())
    fail = lambda reason: _missing_weights(path, reason, spec)  # noqa: E731
    if is_local(path):
        return local_folder(path, needed, fail, weights)

    from huggingface_hub import snapshot_download

    patterns = [f.split("/")[0] + "/*" for f in needed] + ["model_index.json"]
    cached = cached_snapshot(path, needed, patterns, weights, fail)  # in the local Hub cache: no network at all
    if cached:
        return cached
    check_hub(path, fail)
    return Path(snapshot_download(path, allow_patterns=patterns))


# ----------------------------------------------------------------------------------------------
# The parts of each family


@dataclass(frozen=True)
class Parts:
    """How one family of backbones (`BackboneSpec.family`) builds, loads and encodes its parts."""

    transformer_class: str                     # diffusers class of transformer/config.json
    build_transformer: Callable                # (cfg, in_channels, out_channels) → random transformer
    pretrained_transformer: Callable           # (root, dtype) → transformer
    random_vae: Callable                       # cfg → a VAE of the configured shape
    codec: Callable                            # VAE → Codec
    pretrained_codec: Callable                 # (root, dtype) → Codec
    tiny_text: Callable                        # cfg → text encoders and tokenizers built from configuration
    pretrained_text: Callable                  # root → text encoders and tokenizers
    encode_prompt: Callable                    # (encoders, prompt, max_len) → the prompt cache's tensors
    text_files: tuple[str, ...]                # what a weights folder holds for the text
    text_weight_folders: tuple[str, ...]


# FLUX.1's functions looked up when called (by name in this module), so that a test can stand in for one
PARTS: dict[str, Parts] = {
    "flux1": Parts("FluxTransformer2DModel", lambda *a: build_transformer(*a), lambda *a: _pretrained_transformer(*a),
                   lambda cfg: build_tiny_vae(cfg), VAECodec, lambda *a: _pretrained_codec(*a),
                   lambda cfg: build_tiny_text_encoders(cfg), lambda root: _load_text_encoders(root),
                   lambda *a: _flux1_prompt_tensors(*a), TEXT_FILES, TEXT_WEIGHT_FOLDERS),
    "flux2": Parts("Flux2Transformer2DModel", klein.build_transformer, klein.pretrained_transformer,
                   lambda cfg: klein.build_tiny_vae(cfg, cfg.seed), klein.Flux2Codec, klein.pretrained_codec,
                   klein.build_tiny_text_encoder, klein.pretrained_text_encoder, klein.encode_prompt,
                   ("text_encoder/config.json", "tokenizer"), ("text_encoder",)),
}
