"""Writers and readers of files: a full disk, a read-only folder, the system temp folder, permissions, and
checkpoints copied incompletely (issue 26, item 6)."""

import errno
import os
import re
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from vis2ir import files
from vis2ir.checkpoint import (CONFIG_FILE, LORA_FILE, RESUME_FILE, add_lora, check_init_from, list_checkpoints,
                               load_model, save_weights)
from vis2ir.cli import main
from vis2ir.errors import Vis2IRError
from vis2ir.model import build_model
from vis2ir.train import resume_config, train

from tests.test_train import TINY_RUN

NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder whatever its permissions")


def run(tiny_config, tmp_path, *overrides, name="run"):
    cfg = tiny_config(*TINY_RUN, f"train.output_dir={tmp_path / name}", "train.val_batches=0", *overrides)
    return train(cfg, progress=False)


def modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


@pytest.fixture
def umask():
    """`umask(mask)` for the test; the old one comes back after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


# ----------------------------------------------------------------------------------------------
# A full disk


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["weights", "resume state"])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_nothing(tiny_config, tmp_path, monkeypatch,
                                                                              where):
    """Once a traceback and a partial `.step-N.tmp@…` folder."""
    import vis2ir.checkpoint

    if where == "weights":
        monkeypatch.setattr(vis2ir.checkpoint, "save_file", no_space)
    else:
        monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(Vis2IRError) as err:
        run(tiny_config, tmp_path, "train.max_steps=2", "train.checkpoint_every=2")
    folder = tmp_path / "run" / "checkpoints"
    assert re.fullmatch(rf"{re.escape(str(folder))}: the disk is full, nothing written \(step-2\) \(needs about "
                        r"[\d.,]+ MiB, [\d.,]+ MiB free\); free some space or write to another folder", str(err.value))
    assert list(folder.iterdir()) == []


def test_a_full_disk_in_any_atomic_write_is_one_line(tmp_path, monkeypatch):
    from vis2ir.io.images import write_png

    monkeypatch.setattr(files.os, "replace", no_space)
    with pytest.raises(Vis2IRError, match=rf"^{re.escape(str(tmp_path))}: the disk is full, nothing written "
                                          r"\(a\.png\) \([\d.,]+ MiB free\)"):
        write_png(tmp_path / "a.png", torch.zeros(8, 8, dtype=torch.uint8).numpy())
    assert list(tmp_path.iterdir()) == []


def test_the_resume_state_is_not_staged_in_the_system_temp_folder(tiny_config, tmp_path, monkeypatch):
    """Lightning's writer staged resume.ckpt in the system temp folder (fsspec's mkstemp): a small /tmp broke
    saving. Here the system temp folder does not exist at all."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "no_temp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_temp"))
    run_dir = run(tiny_config, tmp_path, "train.max_steps=2", "train.checkpoint_every=2")
    assert (run_dir / "checkpoints" / "step-2" / RESUME_FILE).exists()
    train(resume_config(str(run_dir), None, ["train.max_steps=3"]), resume=str(run_dir), progress=False)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2", "step-3"]


# ----------------------------------------------------------------------------------------------
# Permissions


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_have_an_ordinary_files_permissions(tiny_config, tmp_path, umask, mask, mode):
    """Once the weights were 0600 (safetensors' own temporary file) and config.yaml 0644: a teammate or the
    app's service account could not read a checkpoint."""
    from safetensors.torch import save_file

    umask(mask)
    run_dir = run(tiny_config, tmp_path, "train.max_steps=2", "train.checkpoint_every=2")
    written = modes(run_dir / "checkpoints" / "step-2")
    assert {LORA_FILE, RESUME_FILE, CONFIG_FILE} <= set(written)
    assert written == dict.fromkeys(written, mode)
    cfg = tiny_config("model.lora.rank=4")
    model = build_model(cfg)
    add_lora(model.transformer, cfg.model.lora)
    save_weights(tmp_path / "exported", model, cfg)
    assert set(modes(tmp_path / "exported").values()) == {mode}
    files.atomic_write(tmp_path / "x.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, str(tmp)))
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == mode


# ----------------------------------------------------------------------------------------------
# An output that cannot be written: one line, before anything loads


def commands(out, source):
    """Every command that writes, with `out` as its output."""
    return {
        "generate": ["generate", "--input", str(source), "--out", str(out)],
        "visualize": ["visualize", "--input", str(source), "--out", str(out)],
        "evaluate": ["evaluate", "--checkpoint", "demo", "--out", str(out)],
        "segment": ["segment", "--input", str(source), "--out", str(out)],
        "data synth": ["data", "synth", "--out", str(out), "--count", "2"],
        "data inspect": ["data", "inspect", str(source), "--out", str(out / "sheet.png")],
        "data convert": ["data", "convert", str(source), "--out", str(out)],
        "data cache": ["data", "cache", "--out", str(out)],
        "ablate": ["ablate", "--out", str(out)],
        "demo": ["demo", "--out", str(out)],
        "train": ["train", f"train.output_dir={out}"],
    }


@pytest.fixture
def loads_nothing(monkeypatch):
    """Fail the test if a model is built."""
    import vis2ir.model

    def touched(*args, **kwargs):
        raise AssertionError("a model loaded before the output was checked")

    monkeypatch.setattr(vis2ir.model, "load_backbone", touched)


def read_only(monkeypatch, folder):
    """`folder` read-only as `os.access` sees it (root writes anywhere, so chmod would not do)."""
    real = os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(folder)
                        else real(p, mode, **kw))


@pytest.mark.parametrize("command", list(commands(Path("."), Path("."))))
def test_a_read_only_output_is_refused_before_anything_loads(tmp_path, monkeypatch, capsys, loads_nothing, command):
    """Once a traceback, and `generate` found out only after loading the model and generating an image."""
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only(monkeypatch, locked)
    out = locked / "out"
    assert main(commands(out, tmp_path)[command]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(locked))} is not writable \(read-only folder or disk\), nothing written; "
                     r"choose a folder you can write to", err), err
    assert err.count("\n") == 1 and not out.exists()


@NOT_ROOT
def test_a_read_only_folder_for_real(tmp_path, capsys, loads_nothing):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["generate", "--input", str(tmp_path), "--out", str(locked / "out")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_a_file_where_the_output_folder_goes_is_refused(tmp_path, capsys, loads_nothing):
    """Real, also as root: the output folder's parent is a file."""
    (tmp_path / "file").write_text("x")
    assert main(["generate", "--input", str(tmp_path), "--out", str(tmp_path / "file" / "out")]) == 2
    assert f"generate --out {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file, not a folder" in \
        capsys.readouterr().err


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_apps_working_folder_is_checked_before_the_models_load(tmp_path, monkeypatch, loads_nothing):
    from vis2ir import app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no_temp"))
    monkeypatch.setattr(app, "load_models", lambda *a: pytest.fail("models loaded first"))
    with pytest.raises(Vis2IRError, match=rf"^{re.escape(str(tmp_path / 'no_temp'))}: could not write \(the app's "
                                          r"working folder; set TMPDIR to another\)"):
        app.serve(port=free_port(), block=False)


# ----------------------------------------------------------------------------------------------
# A checkpoint copied incompletely


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def truncate_lines(path, keep):
    """Cut a YAML file after a whole line (it still parses, its last settings gone: once they silently took
    their defaults)."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:int(len(lines) * keep)]))


DAMAGES = {
    "truncated weights": (LORA_FILE, truncate, r"is incomplete \([\d,]+ of [\d,]+ bytes\)"),
    "missing config": (CONFIG_FILE, lambda p: p.unlink(), "is missing"),
    "truncated config": (CONFIG_FILE, lambda p: truncate_lines(p, 0.6),
                         r"is incomplete \(\d+ of its \d+ settings lost, e\.g\. [\w.]+\)"),
    "missing resume state": (RESUME_FILE, lambda p: p.unlink(), "is missing"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    from tests.conftest import TINY_MODEL
    from vis2ir.config import load_config

    tmp = tmp_path_factory.mktemp("copied")
    cfg = load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={tmp / 'prompts'}", *TINY_RUN,
                             f"train.output_dir={tmp / 'run'}", "train.val_batches=0", "train.max_steps=4",
                             "train.checkpoint_every=2"])
    return train(cfg, progress=False)


def readers(run_dir):
    """Every reader of a checkpoint, each reading `run_dir` (whose newest checkpoint is damaged)."""
    from vis2ir.app import load_models
    from vis2ir.evaluate.run import evaluate_checkpoint
    from vis2ir.pipeline import Vis2IRPipeline

    def init_from():
        cfg = load_config(run_dir / "checkpoints" / "step-2" / CONFIG_FILE, [f"train.init_from={run_dir}"])
        check_init_from(cfg)

    from vis2ir.config import load_config

    return {
        "load_model": lambda: load_model(run_dir),
        "generate --checkpoint": lambda: Vis2IRPipeline.from_checkpoint(run_dir),
        "evaluate --checkpoint": lambda: evaluate_checkpoint(run_dir, out=run_dir.parent / "eval"),
        "app --checkpoint": lambda: load_models(run_dir),
        "train.init_from": init_from,
        "train --resume": lambda: train(resume_config(str(run_dir), None, ["train.max_steps=6"]),
                                        resume=str(run_dir), progress=False),
    }


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_checkpoint_copied_incompletely_is_one_line_from_every_reader(two_checkpoints, tmp_path, damage):
    """Once library tracebacks that named no file (safetensors' 'incomplete metadata', a YAML error, or a
    config with its last settings silently at their defaults)."""
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(two_checkpoints, run_dir)
    name, spoil, problem = DAMAGES[damage]
    damaged = run_dir / "checkpoints" / "step-4"
    spoil(damaged / name)
    for reader, read in readers(run_dir).items():
        if name == RESUME_FILE and reader != "train --resume":
            if reader == "load_model":
                read()  # the weights are whole: a checkpoint copied for inference needs no resume state
            continue
        with pytest.raises(Vis2IRError) as err:
            read()
        assert re.fullmatch(rf"{re.escape(str(damaged / name))}: {problem}, so {re.escape(str(damaged))} is not a "
                            r"whole checkpoint \(written or copied incompletely\); the newest intact checkpoint of "
                            rf"this run is {re.escape(str(run_dir / 'checkpoints' / 'step-2'))}", str(err.value)), \
            (reader, str(err.value))


def _limited(limit: int):
    """For `subprocess`: the child may write files of at most `limit` bytes (RLIMIT_FSIZE). A longer write fails
    in the OS (EFBIG; Python ignores SIGXFSZ), inside whatever library writes: a real write failure, as a full
    disk gives, without needing a small disk."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_the_libraries_write_failures_are_one_line_and_leave_nothing(tmp_path):
    """safetensors reports a failed write as `SafetensorError` ('… (os error 27)'), torch.save as a RuntimeError
    of its zip writer; neither is an `OSError`. `atomic_write` turns both into one line naming the file, and
    leaves no temporary file (before: the library's traceback)."""
    import json
    import subprocess
    import sys

    script = f"""
import json, torch
from pathlib import Path
from safetensors.torch import save_file
from vis2ir.errors import Vis2IRError
from vis2ir.files import atomic_write
folder, lines = Path({str(tmp_path / 'out')!r}), []
for name, write in [("w.safetensors", lambda t: save_file({{"x": torch.zeros(20000)}}, str(t))),
                    ("w.pt", lambda t: torch.save({{"x": torch.zeros(20000)}}, t))]:
    try:
        atomic_write(folder / name, write)
    except Vis2IRError as err:
        lines.append(str(err))
print(json.dumps(lines))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited(16384), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(lines) == 2, lines
    for line, name in zip(lines, ("w.safetensors", "w.pt")):
        assert f"{tmp_path / 'out'}: could not write ({name})" in line and "\n" not in line, line
    assert list((tmp_path / "out").iterdir()) == []  # no temporary file left


def test_a_real_write_failure_while_training_is_one_line_and_leaves_no_partial_checkpoint(tmp_path):
    """`vis2ir train` whose checkpoint cannot be written (the transformer's 0.4 MB file, over the child's 200 kB
    file-size limit): exit status 2, one line naming the checkpoint, no traceback, no `.step-N.tmp` folder
    (before: safetensors' traceback, exit 1, the temporary folder left behind)."""
    import subprocess
    import sys

    from tests.conftest import TINY_MODEL

    run_dir = tmp_path / "run"
    args = [*TINY_MODEL, f"model.prompt_cache_dir={tmp_path / 'prompt_cache'}", *TINY_RUN, "train.finetune=full",
            f"train.output_dir={run_dir}", "train.max_steps=2", "train.checkpoint_every=2", "train.val_every=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "vis2ir.cli", "train", *args], capture_output=True, text=True,
                          timeout=600, env=env, preexec_fn=_limited(200_000))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"{run_dir / 'checkpoints'}: could not write (step-2)" in done.stderr, done.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists() or list((run_dir / "checkpoints").iterdir()) == []


def test_generate_stops_at_a_full_disk_and_marks_no_item_done_that_is_not_whole(tmp_path, monkeypatch):
    """A full disk while `generate --compare` writes a folder's outputs: the run stops at once with one line (it
    went on through every input, each failing alike), and no `<name>.png` (the mark a re-run skips an item by)
    exists without its compare figure: that PNG is written last."""
    from tests.test_bad_inputs import good
    from vis2ir import files as files_module
    from vis2ir.config import load_config
    from vis2ir.generate import run_generate

    from tests.conftest import TINY_MODEL

    good(tmp_path, names=("a", "b", "c"))
    config = tmp_path / "concat.yaml"
    load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={tmp_path / 'cache'}", "model.codec=pixel",
                       "sample.steps=1", "sample.guidance=1.0", "model.semantic.mode=channel_concat"]).save(config)
    real, writes = files_module.fsync, []

    def full_after_two(path):
        if Path(path).is_file():
            writes.append(path)
            if len(writes) > 2:  # the first item's two files go through; then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(files_module, "fsync", full_after_two)
    out = tmp_path / "out"
    with pytest.raises(files_module.DiskFull, match=r"the disk is full, nothing written"):
        run_generate(tmp_path / "visible", out, config=config, semantic=tmp_path / "semantic", compare=True)
    assert len(writes) == 3  # stopped at the first failure, not after every input
    for png in out.glob("*.png"):  # every item marked done is whole
        assert (out / "compare" / png.name).exists(), png


def test_a_write_failure_while_caching_latents_leaves_no_cache_folder(tmp_path):
    """`vis2ir data cache` whose first shard cannot be written (the child's file-size limit): one line, exit
    status 2, and no folder left that looks like a cache (before: safetensors' traceback and an empty folder)."""
    import subprocess
    import sys

    from tests.conftest import TINY_MODEL
    from vis2ir.config import load_config

    config = tmp_path / "tiny.yaml"
    load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={tmp_path / 'prompt_cache'}", *TINY_RUN]).save(config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "vis2ir.cli", "data", "cache", "--config", str(config), "--out",
                           str(tmp_path / "cache")], capture_output=True, text=True, timeout=600, env=env,
                          preexec_fn=_limited(4096))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and f"{tmp_path / 'cache'}: could not write (shard-00000" in done.stderr, \
        done.stderr[-3000:]
    assert not (tmp_path / "cache").exists()
