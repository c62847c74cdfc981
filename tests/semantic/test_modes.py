import copy

import pytest
import torch

from vis2ir.backbone import load_backbone
from vis2ir.config import SemanticConfig
from vis2ir.errors import Vis2IRError
from vis2ir.model import Vis2IRModel
from vis2ir.semantic.modes import build_canvas, crop_target, target_tokens


def panels(b=2, h=16, w=16):
    torch.manual_seed(0)
    return torch.rand(b, 3, h, w), torch.rand(b, 3, h, w), torch.rand(b, 3, h, w)


@pytest.mark.parametrize("mode", ["none", "cross_attention", "channel_concat"])
def test_diptych_modes(mode):
    vis, ir, sem = panels()
    canvas, mask = build_canvas(mode, vis, ir, sem)
    assert torch.equal(canvas, torch.cat([vis, ir], -1))
    assert mask.shape == (2, 1, 16, 32)
    assert mask[..., :16].sum() == 0 and mask[..., 16:].min() == 1
    assert torch.equal(crop_target(canvas, mode), ir)


def test_pixel_fusion_blends_the_visible_panel():
    vis, ir, sem = panels()
    canvas, mask = build_canvas("pixel_fusion", vis, ir, sem, fusion_alpha=0.25)
    assert torch.allclose(canvas[..., :16], 0.75 * vis + 0.25 * sem)
    assert torch.equal(canvas[..., 16:], ir)


def test_in_context_is_a_triptych_masked_in_the_middle():
    vis, ir, sem = panels()
    canvas, mask = build_canvas("in_context", vis, ir, sem)
    assert torch.equal(canvas, torch.cat([vis, ir, sem], -1))
    assert mask[..., :16].sum() == 0 and mask[..., 32:].sum() == 0 and mask[..., 16:32].min() == 1
    assert torch.equal(crop_target(canvas, "in_context"), ir)
    assert target_tokens("in_context", 2, 6).view(2, 6).tolist() == [[False, False, True, True, False, False]] * 2


def test_target_tokens():
    assert target_tokens("none", 2, 4).view(2, 4).tolist() == [[False, False, True, True]] * 2


def test_blank_target_at_sampling_and_missing_semantic_error():
    vis, _, sem = panels()
    canvas, _ = build_canvas("none", vis, None, None)
    assert canvas[..., 16:].abs().sum() == 0
    with pytest.raises(Vis2IRError, match="model.semantic.mode=cross_attention needs a semantic map"):
        build_canvas("cross_attention", vis, None, None)


def test_channel_concat_starts_exactly_as_mode_none(tiny_config):
    """The widened x_embedder's new columns are zero: same output as mode none, same transformer (within float32
    rounding: the wider matrix product may sum in another order, e.g. 7e-7 apart with AVX-512 kernels)."""
    cfg = tiny_config("model.codec=pixel")
    backbone = load_backbone(cfg.model)
    none_model = Vis2IRModel(copy.deepcopy(backbone), SemanticConfig(mode="none"))
    concat = Vis2IRModel(backbone, SemanticConfig(mode="channel_concat"))
    assert concat.transformer.x_embedder.in_features == none_model.transformer.x_embedder.in_features + 192
    vis, ir, sem = panels(2, 32, 32)
    t = torch.tensor([0.3, 0.8])
    noise = torch.randn(2, 32, 192)
    a = none_model(vis, ir, sem, t, noise)
    b = concat(vis, ir, sem, t, noise)
    torch.testing.assert_close(a.pred, b.pred)  # float32 rounding tolerance (rtol 1.3e-6, atol 1e-5)
    # …and the new columns do receive gradient, so training can use the semantic tokens.
    b.pred.square().mean().backward()
    grad = concat.transformer.x_embedder.weight.grad
    assert grad[:, -192:].abs().sum() > 0
