"""The flow-matching objective is one definition: training's forward builds x_t and its target with it, and the
sampler's Euler steps integrate the very velocity it defines back from the noise to the data."""

import torch

from vis2ir.model import build_model
from vis2ir.objective import interpolate, sample_noise, velocity_target
from vis2ir.sample import denoise, get_schedule


def test_the_samplers_euler_steps_with_the_objectives_exact_velocity_map_x1_to_x0(tiny_config, monkeypatch):
    """`sample.denoise` (x ← x + (σ_next − σ)·v̂, σ from 1 to 0) fed the objective's exact target velocity
    starts at the noise x_1, passes through the objective's x_t at every flow time t = σ, and ends at x_0."""
    cfg = tiny_config("model.codec=pixel", "model.semantic.mode=none")
    model = build_model(cfg).eval()
    torch.manual_seed(0)
    vis, ir = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    enc = model.encode(vis, ir)
    x_0 = enc.x_0.float()
    x_1 = sample_noise(x_0, 0.0, torch.Generator().manual_seed(1))
    seen = []

    def exact(x, enc, cond, t, *args):  # the model a perfect training would give: v = x_1 − x_0
        seen.append((x.clone(), t.clone()))
        return velocity_target(x_0, x_1)

    monkeypatch.setattr(model, "predict", exact)
    sigmas = get_schedule(5, x_0.shape[1])  # shifted: unequal steps
    out = denoise(model, enc, x_1.clone(), sigmas, guidance=1.0)
    assert len(seen) == 5
    torch.testing.assert_close(seen[0][0], x_1)
    for x, t in seen:
        torch.testing.assert_close(x, interpolate(x_0, x_1, t))  # the sampler's state at σ is training's x_t
    torch.testing.assert_close(out, x_0)
    assert not torch.allclose(out, x_1)


def test_the_models_forward_trains_on_the_objectives_x_t_and_target(tiny_config):
    """`Vis2IRModel.forward` predicts at x_t = `interpolate(x_0, x_1, t)` and returns `velocity_target(x_0, x_1)`."""
    cfg = tiny_config("model.codec=pixel", "model.semantic.mode=none")
    model = build_model(cfg).eval()
    torch.manual_seed(0)
    vis, ir = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    enc = model.encode(vis, ir)
    t = torch.tensor([0.2, 0.7])
    x_1 = sample_noise(enc.x_0, 0.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred, target = model(vis, ir, None, t, x_1, encoded=enc)
        expected = model.velocity(interpolate(enc.x_0, x_1, t), enc, t)
    torch.testing.assert_close(target, velocity_target(enc.x_0, x_1))
    torch.testing.assert_close(pred, expected)
