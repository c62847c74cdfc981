import logging

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from vis2ir.checkpoint import ADAPTER_FILE, LORA_FILE, PROMPT_FILE, list_checkpoints, load_model
from vis2ir.errors import Vis2IRError
from vis2ir.train import Positioned, StepSampler, flow_loss, sample_timesteps, train

TINY_RUN = ["model.codec=pixel", "model.semantic.mode=cross_attention", "model.semantic.scale_init=0.1",
            "model.lora.rank=4", "data.source=thermalscenes", "data.size=32", "data.synth_count=24", "data.val_fraction=0.2", "data.test_fraction=0.2",
            "data.num_workers=0", "train.batch_size=2", "train.learning_rate=1e-3", "train.adapter_learning_rate=1e-2",
            "train.checkpoint_every=3", "train.val_every=3", "train.val_batches=1", "train.log_every=1"]


def run(tiny_config, tmp_path, *overrides, name="run", resume=None, callbacks=()):
    cfg = tiny_config(*TINY_RUN, f"train.output_dir={tmp_path / name}", *overrides)
    return train(cfg, resume=resume, progress=False, callbacks=callbacks)


def weights(folder):
    return {**load_file(str(folder / LORA_FILE)), **load_file(str(folder / ADAPTER_FILE))}


def test_timesteps_and_loss():
    torch.manual_seed(0)
    t = sample_timesteps(10000)
    assert 0 < t.min() and t.max() < 1 and abs(t.median() - 0.5) < 0.02
    assert sample_timesteps(10000, shift=3.0).median() > 0.7
    pred, target = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    target[:, 2:] = 3
    tokens = torch.tensor([False, False, True, True])
    assert flow_loss(pred, target).item() == 5.0 and flow_loss(pred, target, tokens).item() == 9.0


def test_data_order_is_a_function_of_position():
    data = [torch.tensor(i) for i in range(10)]
    pos = Positioned(data, seed=3)
    first_two_epochs = [int(pos[k]) for k, _ in zip(StepSampler(), range(20))]
    assert sorted(first_two_epochs[:10]) == list(range(10)) and first_two_epochs[:10] != first_two_epochs[10:]
    later = [int(Positioned(data, seed=3)[k]) for k, _ in zip(StepSampler(start=7), range(13))]
    assert later == first_two_epochs[7:]
    ranks = [[k for k, _ in zip(StepSampler(rank=r, world=2), range(5))] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    # Randomness inside a sample (augmentation) is also fixed by its position.

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(())

    a = Positioned(Noisy(), seed=1)
    assert a[5] == Positioned(Noisy(), seed=1)[5] and a[5] != a[6]


def test_training_writes_checkpoints_logs_and_learns(tiny_config, tmp_path):
    run_dir = run(tiny_config, tmp_path, "train.max_steps=12", "train.keep_last=2")
    steps = [p.name for p in list_checkpoints(run_dir)]
    assert steps == ["step-9", "step-12"]  # every 3 steps, the last 2 kept
    ckpt = run_dir / "checkpoints" / "step-12"
    assert {p.name for p in ckpt.iterdir()} == {"config.yaml", LORA_FILE, ADAPTER_FILE, PROMPT_FILE, "resume.ckpt"}
    metrics = (run_dir / "logs" / "version_0" / "metrics.csv").read_text()
    for column in ("train/loss", "train/scale_0", "train/grad_norm", "train/lr_adapter", "train/lr_backbone",
                   "train/step_time", "train/samples_per_s", "val/loss"):
        assert column in metrics.splitlines()[0]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-12.png", "step-3.png", "step-6.png",
                                                                      "step-9.png"]
    model, cfg = load_model(ckpt)
    assert model.adapter.scales()[0] != pytest.approx(0.1)  # the adapter trained
    assert any(p.name.startswith("events") for p in (run_dir / "tensorboard" / "version_0").iterdir())


def test_resume_ends_with_the_same_weights(tiny_config, tmp_path):
    straight = run(tiny_config, tmp_path, "train.max_steps=6", name="straight")
    stopped = run(tiny_config, tmp_path, "train.max_steps=3", name="stopped")
    assert [p.name for p in list_checkpoints(stopped)] == ["step-3"]
    resumed = run(tiny_config, tmp_path, "train.max_steps=6", name="stopped", resume="latest")
    a, b = weights(straight / "checkpoints" / "step-6"), weights(resumed / "checkpoints" / "step-6")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # …and a run that did not resume differs (the test can fail).
    c = weights(stopped / "checkpoints" / "step-3")
    assert any(not torch.allclose(a[k], c[k]) for k in a)


class Poison(L.Callback):
    """Makes the loss non-finite: once at step `at` (bad input) or for good (bad weights)."""

    def __init__(self, at: int, forever: bool):
        self.at, self.forever = at, forever

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at and not self.forever:
            batch["visible"][0, 0, 0, 0] = float("nan")
        if trainer.global_step >= self.at and self.forever:
            with torch.no_grad():
                module.model.adapter.layers[0].scale.fill_(float("inf"))


def test_one_bad_step_is_skipped(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vis2ir")
    run_dir = run(tiny_config, tmp_path, "train.max_steps=4", callbacks=[Poison(2, forever=False)])
    assert "loss is nan (1/5 bad steps in a row); skipping the update" in caplog.text
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3", "step-4"]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_config, tmp_path):
    with pytest.raises(Vis2IRError, match=r"loss was NaN/inf for 2 steps in a row .*last good checkpoint is kept"):
        run(tiny_config, tmp_path, "train.max_steps=10", "train.max_bad_steps=2", callbacks=[Poison(4, forever=True)])
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-3"]
    model, _ = load_model(ckpts[-1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_errors(tiny_config, tmp_path):
    with pytest.raises(Vis2IRError, match="--resume latest: no checkpoint under"):
        run(tiny_config, tmp_path, "train.max_steps=3", resume="latest")


def test_metrics_logs_are_ordered_by_launch(tmp_path):
    """version_10 comes after version_2 (the demo reads only the newest: its own launch)."""
    from vis2ir.train import metrics_logs

    for n in (10, 2, 0):
        (tmp_path / "logs" / f"version_{n}").mkdir(parents=True)
        (tmp_path / "logs" / f"version_{n}" / "metrics.csv").write_text("step,train/loss\n")
    assert [p.parent.name for p in metrics_logs(tmp_path)] == ["version_0", "version_2", "version_10"]
