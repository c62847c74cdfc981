"""Training speed settings: checkpointing by memory budget, compiled blocks, bf16-true precision."""

import logging

import pytest
import torch

from tests.test_train import TINY_RUN, Poison, run, weights
from vis2ir import blocks
from vis2ir.checkpoint import list_checkpoints
from vis2ir.errors import Vis2IRError
from vis2ir.model import build_model
from vis2ir.train import metrics_logs, prepare_for_training, training_tokens

GiB = 2**30


def test_plan_checkpoints_the_fewest_blocks_that_fit():
    full, kept = [10, 10, 6, 6, 6], [2, 2, 2, 2, 2]
    # Nothing to checkpoint when everything fits.
    assert blocks.checkpoint_plan(full, kept, fixed=50, budget=100) == [False] * 5
    # 50 + 38 = 88 > 80: 8 bytes to save; one of the big blocks saves 8.
    assert blocks.checkpoint_plan(full, kept, fixed=50, budget=80) == [True, False, False, False, False]
    # 9 to save: both big blocks (16), not a big and a small one in the wrong order.
    assert blocks.checkpoint_plan(full, kept, fixed=50, budget=79) == [True, True, False, False, False]
    # 50 + 5·2 = 60 is the least: every block.
    assert blocks.checkpoint_plan(full, kept, fixed=50, budget=60) == [True] * 5


def test_plan_refuses_a_budget_below_full_checkpointing():
    with pytest.raises(Vis2IRError, match=r"train.memory_budget_gib=1: .* at least 3.0"):
        blocks.checkpoint_plan([GiB] * 3, [GiB // 2] * 3, fixed=int(1.5 * GiB), budget=GiB)


def test_saved_bytes_counts_what_autograd_keeps():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    # x @ w saves x and w; w is excluded (a weight); the tanh saves its output (4·8 floats).
    assert blocks.saved_bytes(lambda: torch.tanh(x @ w), exclude=[w]) == 2 * x.nbytes


def _prepared(tiny_config, *overrides):
    cfg = tiny_config(*TINY_RUN, *overrides)
    return prepare_for_training(build_model(cfg), cfg), cfg


def _estimate(model, cfg):
    """(fixed, full, kept) of the tiny model at the training shapes, as `plan_checkpointing` measures them."""
    image, text = training_tokens(model, cfg)
    full, kept = blocks.measure_blocks(model.transformer, cfg.train.batch_size, image, text)
    width = model.transformer.config.num_attention_heads * model.transformer.config.attention_head_dim
    return blocks.fixed_bytes(model, 2, cfg.train.batch_size, image + text, width, full), full, kept


def test_auto_checkpointing_checkpoints_the_planned_blocks(tiny_config, caplog, monkeypatch):
    model, cfg = _prepared(tiny_config)
    fixed, full, kept = _estimate(model, cfg)
    assert len(full) == 2 and all(f > k > 0 for f, k in zip(full, kept))
    assert full[0] > full[1]  # the double-stream block keeps more than the single-stream one
    caplog.set_level(logging.INFO, logger="vis2ir")
    # A budget one byte short of no checkpointing: one block (the double one, which saves most) is enough.
    budget = (fixed + sum(full) - 1) / GiB
    model, cfg = _prepared(tiny_config, "train.gradient_checkpointing=auto", f"train.memory_budget_gib={budget}")
    assert "Gradient checkpointing 1 of 2 blocks" in caplog.text and "double 0" in caplog.text
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    enc = model.encode(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))
    pred, target = model(None, None, None, torch.rand(2), torch.randn_like(enc.x_0), encoded=enc)
    pred.square().mean().backward()
    assert [fn.__self__ for fn in calls] == [model.transformer.transformer_blocks[0]]
    # Below full checkpointing: one line naming the setting and what would fit.
    least = (fixed + sum(kept)) / GiB
    with pytest.raises(Vis2IRError, match=rf"train.memory_budget_gib=.*at least {least:.1f}"):
        _prepared(tiny_config, "train.gradient_checkpointing=auto", f"train.memory_budget_gib={least / 2}")


def test_auto_checkpointing_trains(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vis2ir")
    model, cfg = _prepared(tiny_config)
    fixed, full, kept = _estimate(model, cfg)
    budget = (fixed + sum(kept) + 1) / GiB  # every block checkpointed
    run_dir = run(tiny_config, tmp_path, "train.max_steps=3", "train.gradient_checkpointing=auto",
                  f"train.memory_budget_gib={budget}")
    assert "Gradient checkpointing 2 of 2 blocks" in caplog.text
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3"]


def _losses(run_dir):
    import csv

    rows = [r for path in metrics_logs(run_dir) for r in csv.DictReader(path.open()) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in rows]


def test_bf16_true_trains_bf16_lora_on_fp32_masters_and_learns(tiny_config, tmp_path):
    model, cfg = _prepared(tiny_config, "train.precision=bf16-true")
    lora = [p for n, p in model.transformer.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.bfloat16 and p.requires_grad for p in lora)
    assert model.transformer.dtype == torch.bfloat16 and model.adapter.layers[0].scale.dtype == torch.float32
    short = ["train.max_steps=30", "model.semantic.mode=none", "train.learning_rate=3e-3", "train.checkpoint_every=30",
             "train.val_every=1000"]
    bf16 = _losses(run(tiny_config, tmp_path, *short, "train.precision=bf16-true", name="bf16"))
    fp32 = _losses(run(tiny_config, tmp_path, *short, "train.precision=32-true", name="fp32"))
    assert len(bf16) == len(fp32) == 30
    assert sum(bf16[-10:]) < 0.95 * sum(bf16[:10])  # it learns…
    assert sum(bf16[-10:]) == pytest.approx(sum(fp32[-10:]), rel=0.03)  # … as the fp32 run does


def test_bf16_true_resumes_exactly(tiny_config, tmp_path):
    """The fp32 masters travel in the resume state: a resumed run ends where a straight one does."""
    bf16 = ["train.precision=bf16-true", "train.learning_rate=1e-4"]
    straight = run(tiny_config, tmp_path, "train.max_steps=6", *bf16, name="straight")
    run(tiny_config, tmp_path, "train.max_steps=3", *bf16, name="stopped")
    resumed = run(tiny_config, tmp_path, "train.max_steps=6", *bf16, name="stopped", resume="latest")
    a, b = weights(straight / "checkpoints" / "step-6"), weights(resumed / "checkpoints" / "step-6")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bf16_true_bad_step_changes_no_weight_and_counts(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vis2ir")

    class Snapshot(Poison):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == self.at:
                self.before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
            super().on_train_batch_start(trainer, module, batch, batch_idx)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == self.at + 1:
                self.after = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    snap = Snapshot(2, forever=False)
    run(tiny_config, tmp_path, "train.max_steps=4", "train.precision=bf16-true", callbacks=[snap])
    assert "step 2: loss is nan (1/5 bad steps in a row); skipping the update" in caplog.text
    assert snap.before.keys() == snap.after.keys()
    assert all(torch.equal(snap.before[k], snap.after[k]) for k in snap.before)


def test_compiled_blocks_match_eager(tiny_config, monkeypatch):
    """train.compile: the compiled blocks (inductor, g++ on this machine) give the eager loss and gradients."""
    torch.manual_seed(0)
    eager, cfg = _prepared(tiny_config, "train.gradient_checkpointing=true")
    torch.manual_seed(0)
    compiled, _ = _prepared(tiny_config, "train.gradient_checkpointing=true", "train.compile=true")
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks.blocks(compiled.transformer))
    images = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    t, out = torch.tensor([0.3, 0.7]), []
    for model in (eager, compiled):
        enc = model.encode(*images)
        pred, target = model(None, None, None, t, torch.randn(enc.x_0.shape, generator=torch.Generator().manual_seed(5)),
                             encoded=enc)
        loss = (pred - target).square().mean()
        loss.backward()
        grads = [p.grad for n, p in model.transformer.named_parameters() if "lora_B" in n]
        out.append((loss.detach(), grads))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-4)
    for a, b in zip(out[0][1], out[1][1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)


def test_bf16_mixed_trains_with_the_fused_optimizer_and_clipping(tiny_config, tmp_path):
    """Lightning refuses to clip for a fused optimizer under mixed precision; vis2ir clips itself."""
    run_dir = run(tiny_config, tmp_path, "train.max_steps=3", "train.precision=bf16-mixed", "train.grad_clip=0.01")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3"]
