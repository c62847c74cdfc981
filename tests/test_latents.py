import pytest
import torch
from diffusers import AutoencoderKL, FluxFillPipeline
from diffusers.pipelines.flux.pipeline_flux_fill import retrieve_latents

from vis2ir.backbone import build_tiny_vae
from vis2ir.errors import Vis2IRError
from vis2ir.latents import (PixelCodec, VAECodec, VAEGroupNorm, decode_tokens, encode_images, encode_images_fill,
                            fold_mask, group_norm, image_ids, mask_width, pack, token_width, unpack)


@pytest.fixture(scope="module")
def vae(request):
    from vis2ir.config import ModelConfig

    torch.manual_seed(0)
    return build_tiny_vae(ModelConfig()).eval()


def right_half_mask(b, h, w):
    mask = torch.zeros(b, 1, h, w)
    mask[..., w // 2:] = 1
    return mask


def test_pack_matches_diffusers_and_unpacks():
    x = torch.randn(2, 16, 8, 12)
    ref = FluxFillPipeline._pack_latents(x, 2, 16, 8, 12)
    assert torch.equal(pack(x), ref)
    assert torch.equal(unpack(pack(x), 8, 12), x)


def test_image_ids_match_diffusers():
    ref = FluxFillPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)
    assert torch.equal(image_ids(4, 6), ref)


def test_pixel_codec_is_exact():
    codec = PixelCodec(4)
    images = torch.rand(2, 3, 32, 64)
    tokens, ids = encode_images(codec, images)
    assert tokens.shape == (2, 4 * 8, 4 * 48) and ids.shape == (32, 3)  # 32×64 px → 4×8 tokens
    assert torch.allclose(decode_tokens(codec, tokens, 32, 64), images, atol=1e-6)


def test_fill_inputs_match_diffusers(vae):
    """x_cond equals FluxFillPipeline.prepare_mask_latents, x_0 its _pack_latents of the encoded canvas."""
    b, h, w = 2, 64, 128
    canvas = torch.rand(b, 3, h, w)
    mask = right_half_mask(b, h, w)
    x_0, x_cond, ids = encode_images_fill(vae, canvas, mask, generator=torch.Generator().manual_seed(3))

    pipe = FluxFillPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=None)
    gen = torch.Generator().manual_seed(3)
    image = canvas * 2 - 1
    z = retrieve_latents(vae.encode(image), generator=gen)
    ref_x0 = pipe._pack_latents((z - vae.config.shift_factor) * vae.config.scaling_factor, b, 16, h // 8, w // 8)
    ref_mask, ref_masked = pipe.prepare_mask_latents(mask, image * (1 - mask), b, 16, 1, h, w, torch.float32, "cpu", gen)
    ref_cond = torch.cat([ref_masked, ref_mask], dim=-1)
    assert torch.allclose(x_0, ref_x0, atol=1e-5)
    assert torch.allclose(x_cond, ref_cond, atol=1e-5)
    assert torch.equal(ids, pipe._prepare_latent_image_ids(b, h // 16, w // 16, "cpu", torch.float32))


def test_posterior_mode_by_default(vae):
    images = torch.rand(1, 3, 32, 32)
    tokens, _ = encode_images(vae, images)
    z = vae.encode(images * 2 - 1).latent_dist.mode()
    assert torch.allclose(tokens, pack((z - 0.1159) * 0.3611), atol=1e-6)
    again, _ = encode_images(vae, images)
    assert torch.equal(tokens, again)
    sampled, _ = encode_images(vae, images, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, tokens)


def test_sizes_follow_the_codec_at_512(vae):
    """512×512 panels: the specification's shapes, x_0 [B, 2048, 64], x_cond [B, 2048, 320]."""
    canvas = torch.rand(1, 3, 512, 1024)
    x_0, x_cond, ids = encode_images_fill(vae, canvas, right_half_mask(1, 512, 1024))
    assert x_0.shape == (1, 2048, 64) and x_cond.shape == (1, 2048, 320) and ids.shape == (2048, 3)
    assert token_width(vae) == 64 and mask_width(vae) == 256
    codec = PixelCodec(4)
    x_0, x_cond, ids = encode_images_fill(codec, torch.rand(1, 3, 64, 128), right_half_mask(1, 64, 128))
    assert x_0.shape == (1, 128, 192) and x_cond.shape == (1, 128, 256)


def test_mask_folds_like_flux():
    codec = PixelCodec(4)
    mask = right_half_mask(1, 16, 32)
    folded = fold_mask(mask, codec)  # tokens: 2 rows × 4 cols, 64 channels
    assert folded.shape == (1, 8, 64)
    per_token = folded[0].mean(-1).view(2, 4)
    assert torch.equal(per_token, torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]]))


def test_accepts_a_diffusers_autoencoder_directly(vae):
    assert isinstance(vae, AutoencoderKL)
    a, _ = encode_images(vae, torch.rand(1, 3, 32, 32))
    b, _ = encode_images(VAECodec(vae), torch.rand(1, 3, 32, 32).fill_(0.5))
    assert a.shape == b.shape == (1, 4, 64)


@pytest.mark.parametrize("shape, affine", [((2, 64, 16, 24), True), ((1, 32, 100), False), ((3, 8, 4, 4, 4), True)])
def test_group_norm_is_pytorchs(shape, affine):
    """`group_norm` (the VAE's wide groups on CUDA) computes F.group_norm: in float32 within rounding, in bf16
    within two bf16 roundings of the float32 result, on activations whose mean is not small against their spread."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 3 + 1.5
    channels = shape[1]
    weight, bias = (torch.randn(channels, generator=g), torch.randn(channels, generator=g)) if affine else (None, None)
    reference = torch.nn.functional.group_norm(x, 8, weight, bias, 1e-6)
    assert torch.allclose(group_norm(x, 8, weight, bias, 1e-6), reference, atol=1e-5)
    half = group_norm(x.bfloat16(), 8, *(t if t is None else t.bfloat16() for t in (weight, bias)), 1e-6)
    assert half.dtype == torch.bfloat16
    assert (half.float() - reference).abs().max() <= 2**-7 * reference.abs().max()


def test_the_vae_codec_keeps_its_group_norms_weights():
    """`VAECodec` swaps the VAE's GroupNorms for `VAEGroupNorm`s that share their weights: the same state dict,
    and on the CPU (PyTorch's kernel) the same decode."""
    from vis2ir.config import ModelConfig

    torch.manual_seed(0)
    vae = build_tiny_vae(ModelConfig()).eval()
    latents = torch.randn(1, vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, keys = vae.decode(latents).sample, list(vae.state_dict())
        norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
        codec = VAECodec(vae)
        swapped = [m for m in codec.vae.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(swapped) == len(norms) > 0 and all(type(m) is VAEGroupNorm for m in swapped)
        assert all(a.weight is b.weight and a.bias is b.bias for a, b in zip(swapped, norms))
        assert list(vae.state_dict()) == keys
        assert torch.equal(codec.vae.decode(latents).sample, before)


def test_group_norm_keeps_float16s_spread_and_gradients():
    """`group_norm` in float16 on activations whose spread passes 256 (their variance overflows float16: the output
    was the bias alone), and with gradients (its `out=` refused autograd): as F.group_norm."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g) * 300
    weight, bias = torch.randn(16, generator=g), torch.randn(16, generator=g)
    reference = torch.nn.functional.group_norm(x, 4, weight, bias, 1e-6)
    half = group_norm(x.half(), 4, weight.half(), bias.half(), 1e-6)
    assert half.dtype == torch.float16 and (half.float() - reference).abs().max() < 0.05
    x.requires_grad_(True)
    weight.requires_grad_(True)
    out = group_norm(x, 4, weight, bias, 1e-6)
    assert out.dtype == x.dtype and torch.allclose(out, reference, atol=1e-5)
    grads = torch.autograd.grad((out * reference.detach()).sum(), [x, weight])
    expected = torch.autograd.grad((torch.nn.functional.group_norm(x, 4, weight, bias, 1e-6) * reference).sum(),
                                   [x, weight])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(grads, expected))


def test_a_vae_under_accelerate_cpu_offload_still_encodes():
    """A user's VAE already under accelerate's sequential CPU offload (e.g. a diffusers pipeline's, after
    `enable_sequential_cpu_offload`), given to `encode_images`: its group norms keep their offload hooks, which
    bring their weights (new modules in their place had the weights on the meta device: an error)."""
    import copy

    from accelerate import cpu_offload

    from vis2ir.config import ModelConfig

    torch.manual_seed(0)
    vae = build_tiny_vae(ModelConfig()).eval()  # its own: the module's fixture has been through VAECodec already
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = encode_images(copy.deepcopy(vae), images)
        offloaded = copy.deepcopy(vae)
        cpu_offload(offloaded, execution_device="cpu")
        tokens, _ = encode_images(offloaded, images)
    assert torch.allclose(tokens, expected, atol=1e-6)
    assert all(type(m) is VAEGroupNorm for m in offloaded.modules() if isinstance(m, torch.nn.GroupNorm))


def test_bad_size_is_a_clear_error():
    with pytest.raises(Vis2IRError, match="size 30×64 must be a multiple of 8"):
        encode_images(PixelCodec(4), torch.rand(1, 3, 30, 64))
