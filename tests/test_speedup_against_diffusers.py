"""Every piece of the FLUX forward that `speedup.py` and `sample.py` re-implement, against diffusers' own forward.

The sampler runs a patched transformer: the LoRA merged, q/k/v fused and the MLPs' GELU inside their input
product (`fuse_for_sampling`), the RoPE table computed once (`speedup.computed_once`) and the adaLN modulation
read from a table computed once per loop (`modulation_table`). Each patch copies what
`FluxTransformer2DModel.forward` does; if a diffusers release changes that forward, the patched output must
stop matching and these tests fail, rather than sampling silently drifting from what training ran.
The reference is an untouched copy of the same transformer called as diffusers calls it.
"""

import copy

import pytest
import torch

from vis2ir.checkpoint import add_lora
from vis2ir.config import load_config
from vis2ir.model import build_model
from vis2ir.speedup import LinearGELU, computed_once, fuse_for_sampling, modulation_table

from tests.conftest import TINY_MODEL

TOKENS, TEXT = 24, 8


def transformer_with_lora(tmp_path, guidance_embeds: bool):
    """A tiny FLUX transformer with a trained-looking LoRA (random, non-zero B matrices)."""
    cfg = load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={tmp_path}", "model.semantic.mode=none",
                             "model.transformer.num_layers=2", "model.transformer.num_single_layers=2",
                             f"model.transformer.guidance_embeds={str(guidance_embeds).lower()}"])
    torch.manual_seed(0)
    transformer = build_model(cfg).transformer.eval()
    add_lora(transformer, cfg.model.lora)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "lora_" in name else 0.05))
    return transformer


def inputs(transformer, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(5)
    c = transformer.config
    rows, cols = 4, TOKENS // 4
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(rows)), torch.arange(float(cols)),
                                         indexing="ij"), -1).reshape(-1, 3).float()
    return dict(hidden_states=torch.randn(batch, TOKENS, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
                img_ids=img_ids, txt_ids=torch.zeros(TEXT, 3))


def forward(transformer, x: dict, t: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
    return transformer(**x, timestep=t, guidance=guidance, return_dict=False)[0]


@pytest.mark.parametrize("guidance_embeds", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_patched_transformer_is_diffusers_forward(tmp_path, guidance_embeds, autocast):
    """All sampling patches at once, at every step of a loop, for a batch whose images differ: equal to the
    stock forward within rounding (fp32: 1e-5; under bf16 autocast, as validation grids run: one bf16 ulp of
    the output's scale), and the patches really ran (the comparison is not of two stock forwards)."""
    stock = transformer_with_lora(tmp_path, guidance_embeds)
    patched = copy.deepcopy(stock)
    done = fuse_for_sampling(patched)
    assert len(done) == 3, done  # LoRA merged, q/k/v fused, GELU inside the products
    assert any(isinstance(m, LinearGELU) for m in patched.modules())
    x = inputs(stock)
    b = x["hidden_states"].shape[0]
    timesteps = torch.tensor([1.0, 0.7, 0.3])
    guidance = torch.tensor([1.0, 30.0]) if guidance_embeds else None
    tolerance = dict(atol=3e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = [forward(stock, x, t.expand(b), guidance) for t in timesteps]
        with computed_once(patched.pos_embed), \
                modulation_table(patched, timesteps, guidance, x["pooled_projections"]) as at_step:
            got = []
            for i, t in enumerate(timesteps):
                at_step(i)
                got.append(forward(patched, x, t.expand(b), guidance))
    for step, (e, g) in enumerate(zip(expected, got)):
        torch.testing.assert_close(g.float(), e.float(), **tolerance, msg=lambda m: f"step {step}: {m}")
    assert (expected[0] - expected[-1]).abs().max() > 1e-2  # the steps differ: each read its own rows
    assert (expected[0][0] - expected[0][1]).abs().max() > 1e-2  # so do the images


def test_a_change_in_diffusers_forward_is_caught(tmp_path, monkeypatch):
    """The comparison above is sensitive to the forward it copies: if diffusers scaled the timestep differently
    (as its forward does, ×1000, before `time_text_embed`), the table's rows would no longer be the layers'
    (simulated here by patching the stock forward's embedder), and the outputs part."""
    stock = transformer_with_lora(tmp_path, True)
    patched = copy.deepcopy(stock)
    fuse_for_sampling(patched)
    x = inputs(stock)
    b = x["hidden_states"].shape[0]
    timesteps, guidance = torch.tensor([0.6]), torch.tensor([3.5, 3.5])
    embed = stock.time_text_embed.forward
    monkeypatch.setattr(stock.time_text_embed, "forward", lambda t, *rest: embed(t * 0.5, *rest))
    with torch.no_grad():
        expected = forward(stock, x, timesteps.expand(b), guidance)
        with modulation_table(patched, timesteps, guidance, x["pooled_projections"]) as at_step:
            at_step(0)
            got = forward(patched, x, timesteps.expand(b), guidance)
    assert (got - expected).abs().max() > 1e-3
