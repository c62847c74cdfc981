import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from vis2ir.checkpoint import ADAPTER_FILE, LORA_FILE, PROMPT_FILE, list_checkpoints, load_model
from vis2ir.config import load_config
from vis2ir.errors import Vis2IRError
from vis2ir.train import Positioned, StepSampler, flow_loss, sample_timesteps, train

ROOT = Path(__file__).resolve().parents[1]
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
    assert {p.name for p in ckpt.iterdir()} == {"config.yaml", LORA_FILE, ADAPTER_FILE, PROMPT_FILE, "resume.ckpt",
                                                "run.json", "files.json"}
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


@pytest.mark.parametrize("at, max_bad, kept", [
    (5, 2, "step-3"),  # the boundary (step 6) falls after the streak's first bad step
    (4, 3, "step-3"),  # … after its second, with a third to come
    (1, 3, None),      # no good checkpoint yet: step 3 falls inside the streak
])
def test_nan_streak_across_a_checkpoint_keeps_the_good_one(tiny_config, tmp_path, at, max_bad, kept):
    """Non-finite weights are never written, and keep_last=1 never prunes the last good checkpoint."""
    expected = f"last good checkpoint is kept: {tmp_path / 'run' / 'checkpoints' / kept}" if kept else \
        "no checkpoint with finite weights was written"
    with pytest.raises(Vis2IRError, match=f"loss was NaN/inf for {max_bad} steps in a row .*{expected}"):
        run(tiny_config, tmp_path, "train.max_steps=10", f"train.max_bad_steps={max_bad}", "train.keep_last=1",
            callbacks=[Poison(at, forever=True)])
    ckpts = list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ([kept] if kept else [])
    if kept:
        model, _ = load_model(ckpts[-1])
        assert all(torch.isfinite(p).all() for p in model.parameters())


class InfGradient(L.Callback):
    """A finite loss whose gradient is inf at step `at` (an overflow in the backward)."""

    def __init__(self, at: int):
        self.at = at

    def on_after_backward(self, trainer, module):
        if trainer.global_step == self.at:
            module.model.adapter.layers[0].scale.grad.fill_(float("inf"))


def test_a_non_finite_gradient_skips_the_update(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vis2ir")
    run_dir = run(tiny_config, tmp_path, "train.max_steps=3", callbacks=[InfGradient(1)])
    assert "step 1: gradient norm is inf (1/5 bad steps in a row); skipping the update" in caplog.text
    assert all(torch.isfinite(v).all() for v in weights(run_dir / "checkpoints" / "step-3").values())


def test_resume_keeps_the_runs_settings(tiny_config, tmp_path):
    """A resume refuses to change what the run is, deletes nothing before it has written a newer
    checkpoint, and from the command line continues with the run's own settings."""
    from vis2ir.cli import main

    run_dir = run(tiny_config, tmp_path, "train.max_steps=6", "train.keep_last=2")
    config = (run_dir / "config.yaml").read_text()
    with pytest.raises(Vis2IRError, match=r"--resume: train.batch_size=4 differs from the run's 2 \(.*config.yaml\); "
                                          r"a resumed run keeps its settings except train.max_steps"):
        run(tiny_config, tmp_path, "train.max_steps=9", "train.batch_size=4", resume="latest")
    assert (run_dir / "config.yaml").read_text() == config
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3", "step-6"]
    other = tmp_path / "other.yaml"
    other.write_text("data:\n  size: 64\n")
    assert main(["train", "--config", str(other), "--resume", "latest", f"train.output_dir={run_dir}"]) == 2
    # From an earlier checkpoint, with keep_last=1: the newer step-6 is not this launch's to delete,
    # and the checkpoint it has just written (step-4) survives.
    run(tiny_config, tmp_path, "train.max_steps=4", "train.keep_last=1", resume=str(run_dir / "checkpoints" / "step-3"))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-4", "step-6"]
    # Only the output folder and the steps on the command line: the run's data, model and batch are used.
    assert main(["train", "--resume", "latest", f"train.output_dir={run_dir}", "train.max_steps=7"]) == 0
    assert [p.name for p in list_checkpoints(run_dir)][-1] == "step-7"
    saved = load_model(run_dir)[1]
    assert (saved.train.batch_size, saved.train.max_steps, saved.model.weights) == (2, 7, "random")


def test_max_minutes_counts_this_launch_only(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vis2ir")
    run_dir = run(tiny_config, tmp_path, "train.max_steps=3", "train.max_minutes=1000")
    # A first launch that had used up far more than the budget (the time Lightning's Timer records).
    state = run_dir / "checkpoints" / "step-3" / "resume.ckpt"
    ckpt = torch.load(state, weights_only=True)
    ckpt.setdefault("callbacks", {})["Timer"] = {"time_elapsed": {"train": 1e9, "validate": 0.0, "test": 0.0,
                                                                   "predict": 0.0}}
    torch.save(ckpt, state)
    from vis2ir.checkpoint_files import write_manifest

    write_manifest(state.parent)  # the edited state is the checkpoint's own, not a damaged copy
    run(tiny_config, tmp_path, "train.max_steps=5", "train.max_minutes=1000", resume="latest")
    assert list_checkpoints(run_dir)[-1].name == "step-5"
    # A budget that runs out says which setting stopped the run, and how to continue.
    run(tiny_config, tmp_path, "train.max_steps=9", "train.max_minutes=1e-9", resume="latest")
    assert list_checkpoints(run_dir)[-1].name == "step-6"
    assert f"Stopping at step 6 of 9: this launch has run train.max_minutes=1e-09; continue with: vis2ir train " \
           f"--resume {run_dir}" in caplog.text


class Interrupt(L.Callback):
    """Ctrl-C at the start of step `at`."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_writes_the_last_finished_step_and_says_how_to_resume(tiny_config, tmp_path, caplog):
    from vis2ir.cli import main

    caplog.set_level(logging.WARNING, logger="vis2ir")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config, tmp_path, "train.max_steps=10", callbacks=[Interrupt(4)])
    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3", "step-4"]
    assert f"Interrupted at step 4; newest checkpoint {run_dir / 'checkpoints' / 'step-4'}; resume with: " \
           f"vis2ir train --resume {run_dir}" in caplog.text
    assert torch.load(run_dir / "checkpoints" / "step-4" / "resume.ckpt", weights_only=True)["global_step"] == 4
    assert main(["train", "--resume", str(run_dir), "train.max_steps=5"]) == 0
    assert list_checkpoints(run_dir)[-1].name == "step-5"


def _distributed_rank(rank: int, tmp: str, port: int) -> None:
    """One of two processes (gloo, CPU), for each strategy (ddp, then fsdp): a straight run of 4 steps, then a
    resume from step 2; writes each launch's draws (flow times and a digest of torch's RNG) and losses per step."""
    import hashlib
    import json
    import os

    from tests.conftest import TINY_MODEL
    from vis2ir import train as training
    from vis2ir.config import load_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    draws, losses, sample = [], [], training.module.sample_timesteps

    def recording(n, *args, **kwargs):
        t = sample(n, *args, **kwargs)
        draws[-1].append([*t.tolist(), hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()])
        return t

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses[-1].append(float(outputs["loss"]))

    training.module.sample_timesteps = recording
    errors = {}
    for strategy in ("ddp", "fsdp"):
        try:  # a failure of one strategy fails its own test only
            # Validation (with its samples picture: under FSDP a collective) every 2 steps.
            cfg = load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={tmp}/prompt_cache", *TINY_RUN,
                                     f"train.output_dir={tmp}/{strategy}", f"train.strategy={strategy}",
                                     "train.devices=2", "train.accelerator=cpu", "train.checkpoint_every=2",
                                     "train.val_every=2", "sample.steps=2", "train.max_steps=4"])
            for resume in (None, f"{tmp}/{strategy}/checkpoints/step-2"):
                draws.append([])
                losses.append([])
                training.train(cfg, resume=resume, progress=False, callbacks=[Losses()])
        except Exception as err:  # noqa: BLE001
            errors[strategy] = f"{type(err).__name__}: {err}"
    with open(f"{tmp}/draws-{rank}.json", "w") as f:
        json.dump({"draws": draws, "losses": losses, "errors": errors}, f)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The runs of `_distributed_rank`: `(folder, [rank 0's, rank 1's])`, each
    `{"draws"|"losses": [ddp straight, ddp resumed, fsdp straight, fsdp resumed]}`."""
    import json
    import socket

    tmp_path = tmp_path_factory.mktemp("two_processes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_distributed_rank, args=(str(tmp_path), port), nprocs=2)
    return tmp_path, [json.loads((tmp_path / f"draws-{r}.json").read_text()) for r in (0, 1)]


def test_ddp_resume_gives_every_rank_its_own_exact_stream(two_processes):
    _, ranks = two_processes
    assert all("ddp" not in r["errors"] for r in ranks), ranks[0]["errors"]
    (straight0, resumed0), (straight1, resumed1) = (r["draws"][:2] for r in ranks)
    assert len(straight0) == 4 and resumed0 == straight0[2:] and resumed1 == straight1[2:]
    assert all(a != b for a, b in zip(straight0, straight1))  # the ranks draw different t and RNG states
    assert all(a != b for a, b in zip(resumed0, resumed1))


def test_fsdp_trains_as_ddp_and_resumes_exactly(two_processes):
    """train.strategy=fsdp on 2 processes: the same draws and (to float rounding) losses and weights as DDP,
    a resume that repeats the uninterrupted run's losses exactly, and checkpoints in the single-device
    layout: the LoRA loads into a stock FluxFillPipeline, the resume state has DDP's keys."""
    from vis2ir.checkpoint import build_with_weights, load_checkpoint_config
    from vis2ir.model import build_model

    from tests.conftest import stock_pipeline_outputs

    tmp, ranks = two_processes
    assert not ranks[0]["errors"] and not ranks[1]["errors"], ranks[0]["errors"]
    for r in ranks:
        ddp_straight, _, straight, resumed = r["losses"]
        assert len(straight) == 4 and resumed == straight[2:]  # exact
        assert straight == pytest.approx(ddp_straight, rel=1e-5)
        assert r["draws"][2:] == r["draws"][:2]  # FSDP draws what DDP draws
    assert ranks[0]["losses"][2] != ranks[1]["losses"][2]  # each rank its own batch and noise
    fsdp, ddp = tmp / "fsdp" / "checkpoints", tmp / "ddp" / "checkpoints"
    assert [p.name for p in list_checkpoints(tmp / "fsdp")] == ["step-2", "step-4"]
    assert (tmp / "fsdp" / "samples" / "step-4.png").exists()
    ours, theirs = weights(fsdp / "step-4"), weights(ddp / "step-4")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].shape == theirs[k].shape and torch.allclose(ours[k], theirs[k], atol=1e-5), k
    state, ddp_state = (torch.load(d / "step-4" / "resume.ckpt", weights_only=True) for d in (fsdp, ddp))
    assert state.keys() == ddp_state.keys() and state["state_dict"].keys() == ddp_state["state_dict"].keys()
    optimizer, ddp_optimizer = state["optimizer_states"][0], ddp_state["optimizer_states"][0]
    assert optimizer["state"].keys() == ddp_optimizer["state"].keys()
    assert [g["params"] for g in optimizer["param_groups"]] == [g["params"] for g in ddp_optimizer["param_groups"]]
    for i, s in optimizer["state"].items():
        assert torch.allclose(s["exp_avg_sq"], ddp_optimizer["state"][i]["exp_avg_sq"], atol=1e-8)
    # The exported LoRA loads into the stock pipeline and gives what our loader gives.
    cfg = load_checkpoint_config(fsdp / "step-4")
    loaded = build_with_weights(fsdp / "step-4", cfg)
    before, after, mine = stock_pipeline_outputs(build_model(cfg).transformer, fsdp / "step-4", loaded.transformer)
    assert not torch.allclose(before, after, atol=1e-4) and torch.allclose(after, mine, atol=1e-5)


def test_a_run_shorter_than_log_every_writes_its_metrics(tiny_config, tmp_path):
    """Lightning logs every `log_every` steps only; the last step of a launch is logged too."""
    run_dir = run(tiny_config, tmp_path, "train.max_steps=2", "train.log_every=50", "train.val_every=50")
    lines = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    losses = [row.split(",")[header.index("train/loss")] for row in lines[1:]]
    assert [v for v in losses if v], lines  # the loss of the last step is there


def test_a_launch_that_fails_before_training_leaves_no_version_folder(tiny_config, tmp_path, monkeypatch):
    """A launch that fails before its first step leaves no folder it created (issue 29: a misspelt data.source
    left runs/typo2/; a batch larger than the split, found as the loaders start, left runs/ and its parents)
    and no empty logs/version_K: the next launch's logs are version_0. A folder that was there keeps all it
    had: its files, its config.yaml and its earlier launches' logs."""
    from vis2ir.train import module as training_module

    for source in (tmp_path / "nowhere", "thermalscene"):  # a misspelt folder, a misspelt built-in name
        with pytest.raises(Vis2IRError, match="no such folder"):
            run(tiny_config, tmp_path, "train.max_steps=2", f"data.source={source}", name="runs/typo2")
        assert not (tmp_path / "runs").exists()
    with pytest.raises(Vis2IRError, match="train.batch_size=64 is larger than the training split"):
        run(tiny_config, tmp_path, "train.max_steps=2", "train.batch_size=64", name="runs/new/big")
    assert not (tmp_path / "runs").exists()

    def interrupted(*args, **kwargs):  # Ctrl-C while the model is being set up, after the folder was made
        raise KeyboardInterrupt

    monkeypatch.setattr(training_module.Vis2IRModule, "__init__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config, tmp_path, "train.max_steps=2", name="runs/typo2")
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()
    mine = tmp_path / "mine"
    (mine / "logs" / "version_0").mkdir(parents=True)
    (mine / "logs" / "version_0" / "metrics.csv").write_text("step\n")
    (mine / "notes.txt").write_text("mine")
    (mine / "config.yaml").write_text("# mine\n")
    before = {p.relative_to(mine).as_posix(): p.read_bytes() if p.is_file() else None for p in mine.rglob("*")}
    with pytest.raises(Vis2IRError, match="train.batch_size=64 is larger than the training split"):
        run(tiny_config, tmp_path, "train.max_steps=2", "train.batch_size=64", name="mine")
    assert {p.relative_to(mine).as_posix(): p.read_bytes() if p.is_file() else None for p in mine.rglob("*")} == before
    with pytest.raises(Vis2IRError, match="no such folder"):
        run(tiny_config, tmp_path, "train.max_steps=2", f"data.source={tmp_path / 'nowhere'}")
    assert not (tmp_path / "run").exists()
    run_dir = run(tiny_config, tmp_path, "train.max_steps=1")
    assert sorted(p.relative_to(run_dir).as_posix() for p in run_dir.glob("*/version_*")) == [
        "logs/version_0", "tensorboard/version_0"]


def test_resume_and_checkpoint_take_a_runs_checkpoints_folder(tiny_config, tmp_path):
    from vis2ir.checkpoint import find_checkpoint
    from vis2ir.train import resolve_resume

    run_dir = run(tiny_config, tmp_path, "train.max_steps=6")
    assert find_checkpoint(run_dir / "checkpoints") == run_dir / "checkpoints" / "step-6"
    assert resolve_resume(str(run_dir / "checkpoints"), run_dir) == run_dir / "checkpoints" / "step-6" / "resume.ckpt"
    with pytest.raises(Vis2IRError, match=r"nowhere: no such folder"):
        find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(Vis2IRError, match=r"--resume .*nowhere: no such folder"):
        resolve_resume(str(tmp_path / "nowhere"), run_dir)


def test_progress_bar_counts_the_steps_of_this_launch(tiny_config, tmp_path, capsys):
    """Not 'Epoch 0/-2' or '22/10': the optimizer steps this launch runs, out of those it will run."""
    cfg = tiny_config(*TINY_RUN, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3")
    train(cfg, progress=True)
    first = capsys.readouterr()
    train(tiny_config(*TINY_RUN, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=5"), resume="latest",
          progress=True)
    second = capsys.readouterr()
    bars = [(out.out + out.err).replace("\r", "\n") for out in (first, second)]
    assert "train steps: 100%" in bars[0] and "| 3/3 [" in bars[0]
    assert "train steps 4-5: 100%" in bars[1] and "| 2/2 [" in bars[1] and "/5 [" not in bars[1]
    assert not any("Epoch" in bar or "v_num" in bar for bar in bars)


def test_logged_steps_are_the_checkpoint_steps(tiny_config, tmp_path):
    """The loss logged at step N (and the validation after it) belong to the step `step-N` ends with."""
    import csv

    run_dir = run(tiny_config, tmp_path, "train.max_steps=6", "train.log_every=3", "train.keep_last=5")
    rows = list(csv.DictReader((run_dir / "logs" / "version_0" / "metrics.csv").open()))
    train_steps = [int(r["step"]) for r in rows if r["train/loss"]]
    val_steps = [int(r["step"]) for r in rows if r["val/loss"]]
    assert train_steps == val_steps == [3, 6]
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3", "step-6"]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-3.png", "step-6.png"]


def test_the_epoch_column_counts_passes_through_the_training_data(tiny_config, tmp_path):
    """metrics.csv's `epoch` is the pass through the training split each step read (Lightning's own stays 0:
    training is one endless epoch): batch 2 × 2 accumulated = 4 samples a step, across a resume."""
    import csv

    from vis2ir.data import build_dataset

    settings = ("train.accumulate_grad_batches=2", "train.log_every=1")
    run(tiny_config, tmp_path, "train.max_steps=3", *settings)
    run_dir = run(tiny_config, tmp_path, "train.max_steps=6", *settings, resume="latest")
    n = len(build_dataset(tiny_config(*TINY_RUN).data, "train"))
    assert 4 < n < 20  # so that 6 steps of 4 samples cross a pass, and no step reads a whole one
    rows = [r for v in (0, 1) for r in csv.DictReader((run_dir / "logs" / f"version_{v}" / "metrics.csv").open())]
    assert sorted({int(r["step"]) for r in rows}) == [1, 2, 3, 4, 5, 6] and any(r["val/loss"] for r in rows)
    assert [int(r["epoch"]) for r in rows] == [(4 * int(r["step"]) - 1) // n for r in rows]  # validation rows too
    assert int(rows[-1]["epoch"]) >= 1


def test_lightning_advertising_tips_are_silenced(tiny_config, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run(tiny_config, tmp_path, "train.max_steps=1")
    assert "💡" not in caplog.text and "litlogger" not in caplog.text
    assert "`Trainer.fit` stopped: `max_steps=1` reached." in caplog.text  # Lightning's other lines still pass


def test_an_empty_validation_split_trains_with_a_warning(tiny_config, tmp_path, caplog):
    """24 scenes at the default val_fraction (5 %) have no validation sample: training goes on without it."""
    caplog.set_level(logging.WARNING, logger="vis2ir")
    run_dir = run(tiny_config, tmp_path, "train.max_steps=3", "data.val_fraction=0.05", "data.test_fraction=0.05")
    assert "thermalscenes: the validation split is empty (data.val_fraction=0.05 of a small data set); training " \
           "goes on without validation" in caplog.text
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3"]
    assert not (run_dir / "samples").exists()


def test_a_batch_larger_than_the_training_split_is_refused(tiny_config, tmp_path):
    """Not a silent repeat of samples within a batch: one line naming the setting and the split's size."""
    with pytest.raises(Vis2IRError, match=r"^train.batch_size=14 is larger than the training split of thermalscenes "
                                          r"\(13 samples\): a batch would repeat samples; set train.batch_size to "
                                          r"at most 13, or add samples$"):
        run(tiny_config, tmp_path, "train.max_steps=1", "train.batch_size=14")
    assert list_checkpoints(tmp_path / "run") == []
    run(tiny_config, tmp_path, "train.max_steps=1", "train.batch_size=13")  # the whole split is one batch


def test_init_from_names_the_shipped_checkpoint_and_refuses_another_shape(tiny_config, tmp_path, monkeypatch):
    from vis2ir.checkpoint import SHIPPED, checkpoint_path, find_checkpoint
    from vis2ir.demo import DEMO_CHECKPOINT

    assert find_checkpoint("demo") == SHIPPED["demo"] == DEMO_CHECKPOINT
    assert checkpoint_path("demo") == DEMO_CHECKPOINT  # `vis2ir demo --checkpoint demo` too
    monkeypatch.chdir(tmp_path)  # a folder called demo is ./demo
    with pytest.raises(Vis2IRError, match="demo: no such folder, so no checkpoint here"):
        find_checkpoint("./demo")
    with pytest.raises(Vis2IRError, match=r"^train.init_from=demo: model.pixel_factor=2 differs from the checkpoint's "
                                          r"4 \(.*assets/demo/config.yaml\); a checkpoint runs with the model"):
        train(load_config(ROOT / "configs" / "finetune_demo.yaml", [f"train.output_dir={tmp_path / 'run'}",
                                                                    "model.pixel_factor=2"]), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_keep_last_larger_than_the_run_keeps_every_checkpoint(tiny_config, tmp_path):
    """keep_last=4 with two older checkpoints: nothing is pruned (a negative slice end once deleted one)."""
    run_dir = run(tiny_config, tmp_path, "train.max_steps=9", "train.keep_last=4", "train.val_every=100")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3", "step-6", "step-9"]


def test_train_compile_without_a_compiler_is_one_line(tiny_config, tmp_path, no_compiler):
    """train.compile where inductor cannot build (here: no C++ compiler) → one line naming the setting, and the
    failed launch leaves no log version behind."""
    with pytest.raises(Vis2IRError) as err:
        run(tiny_config, tmp_path, "train.max_steps=2", "train.compile=true", "train.val_batches=0")
    message = str(err.value)
    assert message.startswith("train.compile: torch.compile could not compile") and "\n" not in message
    assert message.endswith("set train.compile=false")
    assert not list((tmp_path / "run").glob("*/version_*"))
