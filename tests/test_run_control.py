"""Runs you can trust (issue 26, training state): stops by signal or time land on an optimizer-step boundary
and resume exactly, a run folder is never mixed with a second run, finished and old runs are answered in one
line, every checkpoint carries its run identity (run.json), and offset noise is one value per channel."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from tests.conftest import TINY_MODEL
from tests.test_train import ROOT, TINY_RUN, run, weights
from vis2ir import __version__
from vis2ir.checkpoint import list_checkpoints
from vis2ir.errors import Vis2IRError
from vis2ir.latents import PixelCodec, pack, unpack
from vis2ir.train.identity import RUN_FILE, STATE_FORMAT
from vis2ir.train import offset_group, sample_noise

ACC = ["train.accumulate_grad_batches=2", "train.checkpoint_every=100", "train.val_every=100"]


def assert_same_weights(a, b):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def refresh_manifest(folder):
    """After a test edits a checkpoint's files: its file list (files.json) again, so that the edit is not taken
    for an incomplete copy."""
    from vis2ir.checkpoint_files import write_manifest

    write_manifest(folder)


class SendSignal(L.Callback):
    """Sends `signum` to this process at the first micro-batch of optimizer step `step + 1` (mid-accumulation)."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step, self.sent = signum, step, False

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            if signal.getsignal(self.signum) in (signal.SIG_DFL, None):
                pytest.fail(f"{signal.Signals(self.signum).name} would end the process: no handler while training")
            os.kill(os.getpid(), self.signum)


def test_ctrl_c_inside_an_accumulated_step_stops_at_its_end_and_resumes_exactly(tiny_config, tmp_path, caplog):
    """Ctrl-C between the two micro-batches of step 3: step 3 is finished and saved, and the resumed run ends
    with the weights of an uninterrupted one (main: saved step 2 mid-accumulation, resumed out of phase)."""
    caplog.set_level(logging.WARNING, logger="vis2ir")
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN where the suite runs in the background
    straight = run(tiny_config, tmp_path, *ACC, "train.max_steps=5", name="straight")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config, tmp_path, *ACC, "train.max_steps=5", callbacks=[SendSignal(signal.SIGINT, 2)])
    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3"]
    assert f"Interrupted at step 3; newest checkpoint {run_dir / 'checkpoints' / 'step-3'}; resume with: " \
           f"vis2ir train --resume {run_dir}" in caplog.text
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after training
    run(tiny_config, tmp_path, *ACC, "train.max_steps=5", resume="latest")
    assert_same_weights(straight / "checkpoints" / "step-5", run_dir / "checkpoints" / "step-5")


class HardInterrupt(L.Callback):
    """`KeyboardInterrupt` raised inside optimizer step `step + 1`, at its second micro-batch (a second Ctrl-C)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step and batch_idx % 2 == 1:
            raise KeyboardInterrupt


def test_an_interrupt_raised_inside_an_accumulated_step_saves_a_state_that_resumes_exactly(tiny_config, tmp_path):
    """No flag to wait for (a second Ctrl-C): the last finished step is saved with the loop at its boundary."""
    straight = run(tiny_config, tmp_path, *ACC, "train.max_steps=5", name="straight")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config, tmp_path, *ACC, "train.max_steps=5", callbacks=[HardInterrupt(3)])
    run_dir = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3"]
    run(tiny_config, tmp_path, *ACC, "train.max_steps=5", resume="latest")
    assert_same_weights(straight / "checkpoints" / "step-5", run_dir / "checkpoints" / "step-5")


def test_sigusr1_and_max_minutes_stop_between_optimizer_steps(tiny_config, tmp_path, caplog):
    """SIGUSR1 (SLURM's warning before the time limit) mid-accumulation: the step is finished and saved, then
    `Stopped` (exit status 138). A time budget that runs out at once stops after one whole optimizer step
    (main: after one micro-batch, with nothing saved). Both resume to the uninterrupted run's weights."""
    caplog.set_level(logging.WARNING, logger="vis2ir")
    straight = run(tiny_config, tmp_path, *ACC, "train.max_steps=4", name="straight")
    run_dir = run(tiny_config, tmp_path, *ACC, "train.max_steps=4", "train.max_minutes=1e-9")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-1"]
    assert "Stopping at step 1 of 4: this launch has run train.max_minutes=1e-09" in caplog.text
    from vis2ir.signals import Stopped

    with pytest.raises(Stopped) as stop:
        run(tiny_config, tmp_path, *ACC, "train.max_steps=4", "train.max_minutes=null", resume="latest",
            callbacks=[SendSignal(signal.SIGUSR1, 2)])
    assert stop.value.exit_status == 128 + signal.SIGUSR1
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-1", "step-3"]
    assert f"Stopped by SIGUSR1 at step 3; newest checkpoint {run_dir / 'checkpoints' / 'step-3'}" in caplog.text
    assert torch.load(run_dir / "checkpoints" / "step-3" / "resume.ckpt", weights_only=True)["global_step"] == 3
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    run(tiny_config, tmp_path, *ACC, "train.max_steps=4", resume="latest")
    assert_same_weights(straight / "checkpoints" / "step-4", run_dir / "checkpoints" / "step-4")


def test_sigterm_saves_the_last_step_prints_the_resume_command_and_exits_143(tmp_path):
    """`vis2ir train` as a scheduler sees it: SIGTERM to every process of the job (the data loader's workers
    too, as SLURM's scancel sends it) after the first checkpoint; the command finishes the accumulated step,
    saves it, says how to resume, and exits 128 + 15 (main: a traceback from the killed workers, or killed
    without a word; no resume command)."""
    run_dir = tmp_path / "run"
    args = [*TINY_MODEL, f"model.prompt_cache_dir={tmp_path / 'prompt_cache'}", *TINY_RUN, "data.num_workers=2",
            f"train.output_dir={run_dir}", "train.max_steps=100000", "train.accumulate_grad_batches=2",
            "train.val_every=100000", "train.checkpoint_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "vis2ir.cli", "train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        while not list_checkpoints(run_dir) and proc.poll() is None:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    newest = list_checkpoints(run_dir)[-1]
    step = int(newest.name[5:])
    assert f"Stopped by SIGTERM at step {step}; newest checkpoint {newest}; resume with: vis2ir train --resume " \
           f"{run_dir}" in err
    assert "vis2ir: stopped by SIGTERM" in err and "Traceback" not in err
    state = torch.load(newest / "resume.ckpt", weights_only=True)
    assert state["global_step"] == step and state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"][
        "processed"] == 2 * step  # saved at the step's boundary


def test_a_second_launch_into_a_run_folder_is_refused_before_the_model_loads(tiny_config, tmp_path, monkeypatch):
    """Training again into a folder that holds a run: one line naming its newest checkpoint and the ways out,
    before any model is built, nothing on disk changed; `--resume` of a finished run: one line saying to
    raise train.max_steps, exit status 2. A folder left by a launch that failed before its first checkpoint
    (config, logs) is no run: a fresh launch goes ahead. keep_last holds across launches."""
    from vis2ir import train as training
    from vis2ir.cli import main

    run_dir = run(tiny_config, tmp_path, "train.max_steps=6", "train.keep_last=2")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(training.module, "build_model", no_model)
    monkeypatch.setattr(training.Vis2IRModule, "configure_model", no_model)
    newest = run_dir / "checkpoints" / "step-6"
    with pytest.raises(Vis2IRError, match=rf"^train.output_dir={run_dir} already holds a run \(newest checkpoint "
                                          rf"{newest}\); continue it with: vis2ir train --resume {run_dir}, or train "
                                          rf"into a new train.output_dir, or delete {run_dir} to start it again$"):
        run(tiny_config, tmp_path, "train.max_steps=6", "train.keep_last=2")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    assert main(["train", "--resume", str(run_dir)]) == 2
    with pytest.raises(Vis2IRError, match=rf"^--resume {run_dir}: the run is finished at step 6 \({newest}; "
                                          rf"train.max_steps=6\); to train on, raise train.max_steps, e.g. vis2ir "
                                          rf"train --resume {run_dir} train.max_steps=12$"):
        run(tiny_config, tmp_path, "train.max_steps=6", resume=str(run_dir))
    monkeypatch.undo()
    run(tiny_config, tmp_path, "train.max_steps=12", "train.keep_last=2", resume=str(run_dir))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-9", "step-12"]
    # Only the config and logs of a launch that never reached a checkpoint: not a run, a new launch starts.
    failed = tmp_path / "failed"
    (failed / "logs").mkdir(parents=True)
    (failed / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    run(tiny_config, tmp_path, "train.max_steps=1", name="failed")
    assert [p.name for p in list_checkpoints(failed)] == ["step-1"]


def test_a_run_inside_another_run_or_checkpoint_is_refused_and_pruning_keeps_what_is_not_a_checkpoint(
        tiny_config, tmp_path, monkeypatch, caplog):
    """train.output_dir inside a run (its checkpoints/ folder, a checkpoint of it, or below one) or inside a
    checkpoint folder: one line naming it and the way out, before any model loads, nothing written. Once such
    a nested run trained and mixed its files into the outer run's checkpoint, which the outer run's keep_last
    pruning then deleted with the nested run, without a word. Pruning deletes only checkpoint folders."""
    from vis2ir import train as training
    from vis2ir.checkpoint import save_weights
    from vis2ir.model import build_model

    run_dir = run(tiny_config, tmp_path, "train.max_steps=2", "train.checkpoint_every=1", "train.val_every=100")
    step = run_dir / "checkpoints" / "step-2"
    alone = tmp_path / "alone"
    full = tiny_config(*TINY_RUN, "train.finetune=full")
    save_weights(alone, build_model(full), full)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(training.module, "build_model", no_model)
    monkeypatch.setattr(training.Vis2IRModule, "configure_model", no_model)
    for inside, outer in ((run_dir / "checkpoints", f"the run {run_dir}"),
                          (step, f"the run {run_dir}"),
                          (step / "new" / "deeper", f"the run {run_dir}"),
                          (run_dir / "logs" / "new", f"the run {run_dir}"),
                          (alone / "new", f"the checkpoint {alone}")):
        folder = alone if inside.parent == alone else run_dir
        with pytest.raises(Vis2IRError, match=rf"^train.output_dir={re.escape(str(inside))} lies inside "
                                              rf"{re.escape(outer)}; .*choose another train.output_dir, outside "
                                              rf"{re.escape(str(folder))}$"):
            run(tiny_config, tmp_path, "train.max_steps=2", name=str(inside.relative_to(tmp_path)))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    monkeypatch.undo()
    # A run nested in step-1 by a version without this check: the outer run's pruning leaves it be.
    nested = run_dir / "checkpoints" / "step-1" / "checkpoints" / "step-1"
    nested.mkdir(parents=True)
    (nested / "config.yaml").write_text("nested run\n")
    with caplog.at_level(logging.WARNING, logger="vis2ir"):
        run(tiny_config, tmp_path, "train.max_steps=4", "train.checkpoint_every=1", "train.val_every=100",
            "train.keep_last=1", resume=str(run_dir))
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-1", "step-4"] and (nested / "config.yaml").exists()
    assert f"{run_dir / 'checkpoints' / 'step-1'}: not pruned (train.keep_last)" in caplog.text


def test_every_checkpoint_records_its_run_and_a_resume_checks_the_data(tiny_config, tmp_path):
    """run.json in every checkpoint (version, state format, step, data fingerprint, base); a resume after a
    training image changed is refused in one line naming the change and the ways out."""
    from vis2ir.data import write_thermalscenes
    from vis2ir.data.fingerprint import data_fingerprint

    data = write_thermalscenes(tmp_path / "data", count=12, size=32)
    source = [f"data.source={data}", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    run_dir = run(tiny_config, tmp_path, *source, "train.max_steps=3")
    checkpoint = run_dir / "checkpoints" / "step-3"
    identity = json.loads((checkpoint / RUN_FILE).read_text())
    cfg = tiny_config(*TINY_RUN, *source)
    assert identity == {"vis2ir_version": __version__, "state_format": STATE_FORMAT, "step": 3,
                        "data": data_fingerprint(cfg.data, "train"), "base": None}
    for image in (data / "infrared").iterdir():  # the same samples, their infrared files changed
        image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(Vis2IRError, match=rf"^--resume latest: the training data changed since {checkpoint} \(files "
                                          r"of the same samples changed .*put the data back as it was, or start a new "
                                          r"run from these weights: vis2ir train train.init_from="):
        run(tiny_config, tmp_path, *source, "train.max_steps=4", resume="latest")
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-3"]


def test_a_run_folder_of_the_previous_release_resumes_exactly(tiny_config, tmp_path):
    """A checkpoint as vis2ir 0.1.0 wrote it before 2026-11-30 (commit 68fc6f7: no run.json, AdamW param groups
    saved with fused None) resumes to the weights of an uninterrupted run; on main it failed at step 4 in
    torch's AdamW ("AssertionError: Expected grad_scale and found_inf to be None"). A state of a newer format
    is refused in one line naming both versions."""
    straight = run(tiny_config, tmp_path, "train.max_steps=4", "train.val_every=100", name="straight")
    run_dir = run(tiny_config, tmp_path, "train.max_steps=3", "train.val_every=100")
    old = run_dir / "checkpoints" / "step-3"
    for name in (RUN_FILE, "files.json"):  # written by neither
        (old / name).unlink(missing_ok=True)
    state = torch.load(old / "resume.ckpt", weights_only=True)
    for group in state["optimizer_states"][0]["param_groups"]:
        group["fused"], group["foreach"] = None, None  # torch.optim.AdamW(groups, lr=..., weight_decay=...)
    torch.save(state, old / "resume.ckpt")
    run(tiny_config, tmp_path, "train.max_steps=4", "train.val_every=100", resume="latest")
    assert_same_weights(straight / "checkpoints" / "step-4", run_dir / "checkpoints" / "step-4")
    newest = run_dir / "checkpoints" / "step-4"
    identity = json.loads((newest / RUN_FILE).read_text())
    for version, said in (("9.0", " (9.0)"), (__version__, "")):  # the same version number: no "use it" advice
        (newest / RUN_FILE).write_text(json.dumps({**identity, "vis2ir_version": version, "state_format": 99}))
        refresh_manifest(newest)
        with pytest.raises(Vis2IRError, match=rf"was written with state format 99 by a newer vis2ir{re.escape(said)} "
                                              rf"than this one \({__version__}, state format {STATE_FORMAT}\): upgrade "
                                              r"vis2ir to resume it, or start a new run from its weights: vis2ir train "
                                              rf"train.init_from={newest} train.output_dir=NEW_FOLDER$"):
            run(tiny_config, tmp_path, "train.max_steps=5", "train.val_every=100", resume="latest")


@pytest.mark.parametrize("codec, channels", [("vae", 16), ("pixel", 3)])
def test_offset_noise_is_one_value_per_channel_and_sample(codec, channels):
    """Unpacked to channels (and, for the pixel codec, to pixels), the offset is constant over every position
    of a channel with the intended spread (main: a 2×2 checkerboard of four values, half the spread)."""
    n, h, w = 4000, 4, 4
    if codec == "pixel":
        pixel = PixelCodec()
        group = offset_group(pixel)
        x_0 = pack(pixel.encode(torch.zeros(n, 3, h * pixel.factor, w * pixel.factor)))
    else:
        group = 4
        x_0 = pack(torch.zeros(n, 16, h, w))
    plain = sample_noise(x_0, 0.0, torch.Generator().manual_seed(1), group)
    offset = sample_noise(x_0, 0.5, torch.Generator().manual_seed(1), group) - plain  # same base draws
    shifts = unpack(offset, h, w)
    if codec == "pixel":
        shifts = pixel.decode(shifts)
    assert shifts.shape[:2] == (n, channels)
    per_channel = shifts.flatten(2)
    torch.testing.assert_close(per_channel, per_channel[..., :1].expand_as(per_channel))
    assert per_channel[..., 0].std().item() == pytest.approx(0.5, rel=0.05)
    assert len(per_channel[0, :, 0].unique()) == channels  # one draw per channel, not one for all


def test_ablate_does_not_resume_a_variant_whose_training_finished(tiny_config, tmp_path, caplog, monkeypatch):
    """A variant trained to its train.max_steps whose records were lost (trained.json, result.json) is evaluated
    again, not resumed: a finished run's resume is refused, and the ablation does not ask for one."""
    from tests.evaluate.test_evaluate import TINY_RUN as EVAL_RUN
    from vis2ir.evaluate.ablate import run_ablation

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no FID/LPIPS weights
    for env in ("VIS2IR_FID_WEIGHTS", "VIS2IR_LPIPS_WEIGHTS"):
        monkeypatch.delenv(env, raising=False)
    caplog.set_level(logging.INFO, logger="vis2ir")
    base = tmp_path / "base.yaml"
    tiny_config(*EVAL_RUN, "eval.limit=2").save(base)
    run_ablation(base, [], out=tmp_path / "abl", progress=False)
    variant = next((tmp_path / "abl" / "variants").iterdir())
    (variant / "trained.json").unlink()
    (variant / "result.json").unlink()
    caplog.clear()
    run_ablation(base, [], out=tmp_path / "abl", progress=False)
    assert (variant / "result.json").exists() and "Training" not in caplog.text
