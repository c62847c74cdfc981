"""FLUX.2 [klein] (`model.backbone: flux2-klein`): its codec, ids, noise, schedule shift and parts built from
configuration, as diffusers 0.42.1 `Flux2KleinPipeline` does them (`pipelines/flux2/pipeline_flux2_klein.py`).

What differs from FLUX.1 (facts read in that pipeline and checked by tests/test_klein.py against it):

- Codec: `AutoencoderKLFlux2` (32 latent channels at full size); a token is a 2×2 patch, channel-major
  (`_patchify_latents`, the same order as `latents.pack`), normalised per token channel by the VAE's batch-norm
  running statistics, `(z − mean) / sqrt(var + eps)` (`_encode_vae_image`), not by a shift and a scale.
- Ids have four axes (t, row, col, l): the target (0, r, c, 0), the reference photo (10, r, c, 0)
  (`_prepare_image_ids(scale=10)`), the prompt's tokens (0, 0, 0, l) (`_prepare_text_ids`).
- Noise is drawn already patchified, `randn(B, 4C, H/16, W/16)`, and flattened token by token
  (`prepare_latents`, `_pack_latents`): the same numbers as FLUX.1's noise in another order.
- The schedule's shift μ = `compute_empirical_mu(N, steps)` depends on the step count as well as the token count.
- The prompt: Qwen3 through its chat template (`enable_thinking=False`), padded to `max_sequence_length`, the
  hidden states of three layers concatenated per token (9, 18 and 27 of Qwen3-4B's 36); no pooled embedding and
  no guidance embedding. Guidance > 1 on a checkpoint that is not step-distilled runs true classifier-free
  guidance against the empty prompt (`do_classifier_free_guidance`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from einops import rearrange

from vis2ir.errors import Vis2IRError
from vis2ir.latents import Codec, VAECodec

REFERENCE_INDEX = 10  # `Flux2KleinPipeline._prepare_image_ids(scale=10)`: the first reference's t coordinate
KLEIN_LAYER_FRACTIONS = (1, 2, 3)  # quarters of Qwen3's depth: 9, 18, 27 of Qwen3-4B's 36 layers


class Flux2Codec(VAECodec):
    """An `AutoencoderKLFlux2` whose latents come out normalised as FLUX.2 tokens want them.

    `encode`: images in [-1, 1] `[B, 3, H, W]` → latents `[B, C, H/8, W/8]` (posterior mode, or a sample with a
    generator) normalised per 2×2 patch channel: patchified to `[B, 4C, H/16, W/16]`, `(x − running_mean) /
    sqrt(running_var + batch_norm_eps)` (the VAE's `bn`), unpatchified again, so that `latents.pack` gives
    stock's normalised tokens exactly (the patchify is a permutation). `decode` undoes it."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__(vae)
        self.shift, self.scale = 0.0, 1.0

    def _statistics(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.dtype)).latent_dist
        z = patchify(dist.sample(generator) if generator is not None else dist.mode())
        mean, std = self._statistics(z)
        return unpatchify((z - mean) / std)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = patchify(latents.to(self.dtype))
        mean, std = self._statistics(z)
        return self.vae.decode(unpatchify(z * std + mean)).sample


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """`[B, C, h, w]` → `[B, 4C, h/2, w/2]`, channel-major inside a patch (stock `_patchify_latents`)."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=2, pw=2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify` (stock `_unpatchify_latents`)."""
    return rearrange(latents, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=2, pw=2)


def image_ids(rows: int, cols: int, index: int = 0, device=None) -> torch.Tensor:
    """FLUX.2 position ids `[rows·cols, 4]` = (index, row, col, 0), float32: the target has index 0, the reference
    photo `REFERENCE_INDEX` (stock `_prepare_latent_ids`, `_prepare_image_ids`; its int64 ids are cast to
    float by `Flux2PosEmbed`, so the values are the same)."""
    r = torch.arange(rows, device=device, dtype=torch.float32)
    c = torch.arange(cols, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)
    first = torch.full_like(grid[:, :1], float(index))
    return torch.cat([first, grid, torch.zeros_like(first)], dim=-1)


def text_ids(length: int, device=None) -> torch.Tensor:
    """FLUX.2 ids of the prompt's `length` tokens `[length, 4]` = (0, 0, 0, l) (stock `_prepare_text_ids`)."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device, dtype=torch.float32)
    return ids


def noise_shape(codec: Codec, height: int, width: int) -> tuple[int, int, int]:
    """The shape of one image's initial noise for a `height × width` target: `(4C, H/2s, W/2s)`, drawn
    patchified (stock `prepare_latents`: `(B, 128, H/16, W/16)` with FLUX.2's VAE)."""
    s = 2 * codec.scale_factor
    return 4 * codec.latent_channels, height // s, width // s


def pack_noise(noise: torch.Tensor) -> torch.Tensor:
    """Patchified noise `[B, 4C, h, w]` → tokens `[B, h·w, 4C]` (stock `_pack_latents`)."""
    return rearrange(noise, "b c h w -> b (h w) c")


def empirical_mu(seq_len: int, steps: int) -> float:
    """The schedule's shift μ for `seq_len` target tokens and `steps` steps: a line in the step count between
    fits at 10 and 200 steps, each a line in the token count; beyond 4300 tokens the 200-step fit alone
    (diffusers 0.42.1 `compute_empirical_mu`, from black-forest-labs/flux2)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if seq_len > 4300:
        return float(a2 * seq_len + b2)
    m_200, m_10 = a2 * seq_len + b2, a1 * seq_len + b1
    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    return float(a * steps + b)


# ----------------------------------------------------------------------------------------------
# Parts built from configuration or loaded


def build_transformer(cfg, in_channels: int, out_channels: int):
    """A `Flux2Transformer2DModel` of the configured shape with random weights (no guidance embedding, as
    klein; RoPE over the four id axes `model.transformer.axes_dims_rope`)."""
    from diffusers import Flux2Transformer2DModel

    t = cfg.transformer
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=out_channels, num_layers=t.num_layers,
        num_single_layers=t.num_single_layers, attention_head_dim=t.attention_head_dim,
        num_attention_heads=t.num_attention_heads, joint_attention_dim=t.joint_attention_dim,
        axes_dims_rope=tuple(t.axes_dims_rope), guidance_embeds=t.guidance_embeds)


def build_tiny_vae(cfg, seed: int):
    """An `AutoencoderKLFlux2` of the configured shape; its batch-norm running statistics are drawn from `seed`
    (mean ~ N(0, 0.1²), variance in [0.5, 1.5]) so that the normalisation is not the identity."""
    from diffusers import AutoencoderKLFlux2

    v = cfg.vae
    n = len(v.block_out_channels)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(v.block_out_channels),
        layers_per_block=v.layers_per_block, latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups,
        use_quant_conv=False, use_post_quant_conv=False)
    g = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.1)
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    return vae


def pretrained_codec(root: Path, dtype: torch.dtype) -> Flux2Codec:
    """FLUX.2's VAE from `root`/vae (a Flux2KleinPipeline folder) in `dtype`, as a codec."""
    from diffusers import AutoencoderKLFlux2

    return Flux2Codec(AutoencoderKLFlux2.from_pretrained(root, subfolder="vae", torch_dtype=dtype))


def pretrained_transformer(root: Path, dtype: torch.dtype):
    """The `Flux2Transformer2DModel` of `root`/transformer (a Flux2KleinPipeline folder) in `dtype`."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype)


QWEN_CHAT_TEMPLATE = (  # Qwen3's template for user turns, with its `enable_thinking=False` ending
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def tiny_tokenizer():
    """A byte-level `Qwen2Tokenizer` built in code: 256 byte tokens, no merges, Qwen's special tokens and a
    chat template of Qwen3's form."""
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                            "pad_token": "<|endoftext|>"})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def build_tiny_text_encoder(cfg) -> dict:
    """A tiny random Qwen3 (`model.text.num_layers` layers, width `joint_attention_dim / 3`: three layers'
    hidden states are concatenated per token) and the byte-level tokenizer, seeded with `model.text.seed`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = tiny_tokenizer()
    t, width = cfg.text, cfg.transformer.joint_attention_dim // 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        qwen = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=t.num_layers,
            num_attention_heads=2, num_key_value_heads=1, head_dim=width // 2, max_position_embeddings=4096,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    return {"text_encoder": qwen.eval(), "tokenizer": tok}


def pretrained_text_encoder(root: Path) -> dict:
    """Qwen3 and its tokenizer from a `Flux2KleinPipeline` folder, Qwen3 in bf16 (as the FLUX.1 path loads T5;
    the embeddings are computed once and cached, in float32)."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    return {"text_encoder": Qwen3ForCausalLM.from_pretrained(root, subfolder="text_encoder",
                                                             torch_dtype=torch.bfloat16).eval(),
            "tokenizer": AutoTokenizer.from_pretrained(root, subfolder="tokenizer")}


def hidden_layers(num_layers: int) -> tuple[int, ...]:
    """Which of Qwen3's hidden states (0: the embeddings, i: after layer i) make a token's embedding: the
    quarters of its depth, (9, 18, 27) for the 36 layers of Qwen3-4B and -8B (stock's default
    `text_encoder_out_layers`), at least layer 1 each for a tiny encoder."""
    return tuple(max(1, num_layers * k // 4) for k in KLEIN_LAYER_FRACTIONS)


@torch.no_grad()
def encode_prompt(encoders: dict, prompt: str, max_sequence_length: int) -> dict[str, torch.Tensor]:
    """The prompt's and the empty prompt's embeddings `[1, L, 3·D]` float32, with stock's own
    `Flux2KleinPipeline._get_qwen3_prompt_embeds` (chat template, padding to `max_sequence_length`), so the
    result equals stock's. The empty prompt is true CFG's negative."""
    from diffusers import Flux2KleinPipeline

    encoder = encoders["text_encoder"]
    layers = hidden_layers(encoder.config.num_hidden_layers)

    def embed(text: str) -> torch.Tensor:
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            encoder, encoders["tokenizer"], text, dtype=torch.float32, device="cpu",
            max_sequence_length=max_sequence_length, hidden_states_layers=layers).float().cpu()

    return {"prompt_embeds": embed(prompt), "negative_prompt_embeds": embed("")}


def is_distilled(root: Path | None) -> bool:
    """Whether a pipeline folder holds a step-distilled checkpoint (`model_index.json`'s `is_distilled`, as
    stock reads it): such a checkpoint ignores guidance. False for random weights and when unsaid."""
    index = None if root is None else Path(root) / "model_index.json"
    if index is None or not index.is_file():
        return False
    try:
        return bool(json.loads(index.read_text()).get("is_distilled", False))
    except json.JSONDecodeError as err:
        raise Vis2IRError(f"{index}: not valid JSON ({err.msg} at line {err.lineno})") from None

