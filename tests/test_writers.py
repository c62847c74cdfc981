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
