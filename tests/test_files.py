"""Durable atomic writes: files and checkpoint folders are fsynced (file and folder), temporary names
belong to one process, and a failed write leaves the old file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vis2ir import files
from vis2ir.checkpoint import atomic_dir
from vis2ir.errors import Vis2IRError


@pytest.fixture
def synced(monkeypatch):
    """The paths `os.fsync` is called on (files and folders), as the process sees them at that time."""
    paths = []
    real = os.fsync

    def record(fd):
        paths.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return paths


def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, synced):
    path = files.write_text(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    temps = [p for p in synced if p.parent == path.parent and p.name.startswith(".a.txt.tmp-")]
    assert len(temps) == 1 and f"-{os.getpid()}-" in temps[0].name  # the file, under its temporary name
    assert synced.index(temps[0]) < synced.index(path.parent)  # then the folder, after the rename
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = files.write_text(tmp_path / "a.txt", "old")

    def half(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(Vis2IRError, match=r"could not write \(a\.txt\): disk full$"):  # one line, no traceback
        files.atomic_write(path, half)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "weights").write_text("partial")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_checkpoint_folders_are_fsynced(tmp_path, synced):
    with atomic_dir(tmp_path / "step-2") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        (tmp / "config.yaml").write_text("x")
    names = {(p.parent.name, p.name) for p in synced}
    assert {(tmp.name, "config.yaml"), ("sub", "w.bin"), (tmp.name, "sub"), (tmp_path.name, tmp.name)} <= names
    assert synced[-1] == tmp_path  # the parent, after the rename
    assert (tmp_path / "step-2" / "sub" / "w.bin").read_bytes() == b"1"


def test_two_processes_temp_folders_coexist(tmp_path, monkeypatch):
    """Each process writes under its own name; a live process's unfinished folder is never deleted,
    a dead one's (same host) is cleaned up."""
    from vis2ir.checkpoint import temp_dir

    final = tmp_path / "checkpoints" / "step-2"
    final.parent.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        for pid in (live.pid, int(dead.stdout)):
            monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
            folder = temp_dir(final)
            folder.mkdir()
            (folder / "resume.ckpt").write_text(str(pid))
        monkeypatch.undo()
        with atomic_dir(final) as mine:
            (mine / "resume.ckpt").write_text("mine")
            others = sorted(p.name for p in final.parent.iterdir() if p != mine)
            assert len(others) == 1 and f"-{live.pid}-" in others[0]  # the dead process's folder is gone
        assert (final / "resume.ckpt").read_text() == "mine"
        assert (final.parent / others[0] / "resume.ckpt").read_text() == str(live.pid)
    finally:
        live.kill()
        live.wait()


def test_training_writes_its_checkpoint_under_a_name_of_its_own(tiny_config, tmp_path, monkeypatch):
    """`CheckpointExport` writes `step-N` in a temporary folder carrying this process's id (two runs
    sharing an output folder do not delete each other's unfinished checkpoint), then renames it."""
    from vis2ir import train as train_module

    folders = []
    export = train_module.export  # where `CheckpointExport` finds `write_weights`
    real = export.write_weights
    monkeypatch.setattr(export, "write_weights", lambda tmp, *a: folders.append(Path(tmp)) or real(tmp, *a))
    cfg = tiny_config("model.codec=pixel", "model.semantic.mode=none", "data.size=32", "data.synth_count=12",
                      "data.val_fraction=0.2",
                      "data.num_workers=0", "train.batch_size=2", "train.max_steps=1", "train.checkpoint_every=1",
                      "train.val_every=100", f"train.output_dir={tmp_path / 'run'}")
    run = train_module.train(cfg, progress=False)
    assert len(folders) == 1 and folders[0].name.startswith(".step-1.tmp@") and f"-{os.getpid()}-" in folders[0].name
    assert sorted(p.name for p in (Path(run) / "checkpoints").iterdir()) == ["step-1"]


def test_synth_and_inspect_write_through_the_atomic_writer(tmp_path, synced):
    from vis2ir.config import load_config
    from vis2ir.data.inspect import inspect_source
    from vis2ir.data.synth import write_thermalscenes

    out = write_thermalscenes(tmp_path / "ts", count=2, size=32)
    written = sorted(p.relative_to(out) for p in out.rglob("*.png"))
    assert len(written) == 6
    for rel in written:  # each picture fsynced under its temporary name, then its folder
        assert any(p.parent == out / rel.parent and p.name.startswith(f".{rel.name}.tmp-") for p in synced), rel
        assert out / rel.parent in synced
    synced.clear()
    sheet = tmp_path / "sheet.png"
    inspect_source(load_config(None, [f"data.source={out}", "data.size=32"]).data, sheet, count=2)
    assert any(p.name.startswith(".sheet.png.tmp-") for p in synced) and tmp_path in synced
    from PIL import Image

    assert Image.open(sheet).size[1] > 0
    with pytest.raises(Exception, match="sheet.xyz: unknown image suffix"):
        inspect_source(load_config(None, [f"data.source={out}", "data.size=32"]).data, tmp_path / "sheet.xyz")
