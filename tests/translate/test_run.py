"""`vis2ir translate`: a labelled data set in, its infrared version out, on a tiny model built from configuration:
annotations carried over exactly, every photo done once across ranks, a killed run continued without redoing or
corrupting anything, bad photos named while the rest goes on, and the refusals."""

import json
import os
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vis2ir.translate.run as runner
from vis2ir.cli import main
from vis2ir.config import load_config
from vis2ir.errors import Vis2IRError
from vis2ir.palette import class_id, decode
from vis2ir.pipeline import Vis2IRPipeline
from vis2ir.translate.record import read_manifests, state_dir
from vis2ir.translate.run import run_translate

from tests.conftest import TINY_MODEL

SIZES = [(40, 32), (40, 32), (32, 40), (40, 32), (48, 32)]  # (w, h): two batch shapes and a third


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    cache = tmp_path_factory.mktemp("prompt_cache")
    return [*TINY_MODEL, f"model.prompt_cache_dir={cache}", "model.codec=pixel", "model.semantic.mode=channel_concat",
            "sample.steps=2", "sample.guidance=1.0"]


@pytest.fixture(scope="module")
def config_file(overrides, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    load_config(None, overrides).save(path)
    return path


@pytest.fixture(scope="module")
def pipe(overrides):
    return Vis2IRPipeline.from_config(load_config(None, overrides), device="cpu")


def photo(path: Path, size, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=95)
    return path


def yolo_set(root: Path) -> Path:
    """images/{train,val}/*.jpg, labels/ with boxes for all but one photo, classes.txt and a data.yaml."""
    for i, size in enumerate(SIZES):
        split = "train" if i < 3 else "val"
        photo(root / "images" / split / f"p{i}.jpg", size, i)
        if i != 1:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"p{i}.txt").write_text(f"{i % 2} 0.5 0.5 0.4 0.5\n0 0.2 0.3 0.1 0.2\n")
    (root / "classes.txt").write_text("person\ncar\n")
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [person, car]\n")
    return root


def coco_set(root: Path) -> Path:
    images, annotations = [], []
    for i, size in enumerate(SIZES[:3]):
        photo(root / "train2017" / f"{i:06d}.jpg", size, 10 + i)
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": size[0], "height": size[1]})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 3, "bbox": [2, 3, 10, 8], "area": 80,
                            "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 3, "name": "car"}], "info": {"v": 1}}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(data))
    return root


def voc_set(root: Path) -> Path:
    for i, size in enumerate(SIZES[:2]):
        photo(root / "JPEGImages" / f"00000{i}.jpg", size, 20 + i)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"00000{i}.xml").write_text(
            f"<annotation><filename>00000{i}.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            "<depth>3</depth></size><object><name>person</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax>"
            "<ymax>20</ymax></bndbox></object></annotation>\n")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000000\n000001\n")
    return root


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".vis2ir" not in p.parts}


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int32)


def manifest_inputs(out: Path) -> list[str]:
    names = []
    for path in sorted(state_dir(out).glob("manifest-*.jsonl")):
        names += [json.loads(line)["input"] for line in path.read_text().splitlines()]
    return names


def test_yolo_set_translated_with_its_annotations(pipe, tmp_path):
    src, out = yolo_set(tmp_path / "src"), tmp_path / "out"
    summary = run_translate(src, out, pipe=pipe, batch_size=2, workers=1)
    assert (summary.photos, summary.done, summary.skipped, summary.failed) == (5, 5, 0, {})
    before, after = files_of(src), files_of(out)
    for rel, data in before.items():
        if rel.startswith("images/"):  # the photo replaced by its infrared image: same name, format and size
            with Image.open(src / rel) as a, Image.open(out / rel) as b:
                assert (b.format, b.size, b.mode) == ("JPEG", a.size, "L")
        else:
            assert after[rel] == data, rel  # labels, classes.txt, data.yaml: byte for byte
    assert set(after) == set(before) | {"README.md"}
    assert "translated 5; failed 0" in (out / "README.md").read_text()
    assert sorted(manifest_inputs(out)) == sorted(r for r in before if r.startswith("images/"))
    assert 0 <= summary.wait_share <= 1 and summary.images_per_s > 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_translate(src, out, pipe=pipe, workers=0)  # a re-run of a finished translation: nothing to do
    assert (again.done, again.skipped, again.card) == (0, 5, None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def test_box_maps_reach_the_model(pipe, tmp_path, monkeypatch):
    """The maps the model gets are the source's boxes (channel_concat): a photo with a label file gets a
    map with a person box, the photo without one the background-only map."""
    src = yolo_set(tmp_path / "src")
    seen = {}
    real = runner.PhotoSet.__getitem__

    def spy(self, i):
        loaded = real(self, i)
        seen[self.photos[i].rel] = np.asarray(loaded.semantic)
        return loaded

    monkeypatch.setattr(runner.PhotoSet, "__getitem__", spy)
    run_translate(src, tmp_path / "out", pipe=pipe, workers=0)
    classes = {rel: set(np.unique(decode(m)[0]).tolist()) for rel, m in seen.items()}
    person, car, background = (class_id(n) for n in ("person", "car", "background"))
    assert classes["images/train/p1.jpg"] == {background}
    assert classes["images/train/p0.jpg"] == {person, background}
    assert classes["images/train/p2.jpg"] == {person, background}
    assert car in classes["images/val/p3.jpg"]


@pytest.mark.parametrize("image_format", ["source", "png"])
def test_coco_round_trip(pipe, tmp_path, image_format):
    src, out = coco_set(tmp_path / "src"), tmp_path / "out"
    run_translate(src, out, pipe=pipe, image_format=image_format, workers=0)
    source_json = json.loads((src / "annotations" / "instances_train2017.json").read_text())
    out_json = json.loads((out / "annotations" / "instances_train2017.json").read_text())
    if image_format == "source":
        assert files_of(out)["annotations/instances_train2017.json"] == files_of(src)["annotations/instances_train2017.json"]
    for entry in source_json["images"]:
        entry["file_name"] = entry["file_name"][:-4] + (".jpg" if image_format == "source" else ".png")
    assert out_json == source_json  # boxes, polygons, areas, categories, sizes: unchanged; only the suffix
    for image in out_json["images"]:
        with Image.open(out / "train2017" / image["file_name"]) as im:
            assert im.size == (image["width"], image["height"])
            assert im.format == ("JPEG" if image_format == "source" else "PNG")


def test_voc_round_trip_16_bit_png(pipe, tmp_path):
    src, out = voc_set(tmp_path / "src"), tmp_path / "out"
    run_translate(src, out, pipe=pipe, image_format="png", bit_depth=16, workers=0)
    for i in range(2):
        with Image.open(out / "JPEGImages" / f"00000{i}.png") as im:
            assert im.mode == "I;16" and im.size == SIZES[i]
        a = ET.parse(src / "Annotations" / f"00000{i}.xml").getroot()
        b = ET.parse(out / "Annotations" / f"00000{i}.xml").getroot()
        assert b.findtext("filename") == f"00000{i}.png"
        a.find("filename").text = b.findtext("filename")
        assert ET.tostring(a) == ET.tostring(b)
    assert (out / "ImageSets" / "Main" / "train.txt").read_bytes() == (src / "ImageSets" / "Main" / "train.txt").read_bytes()


def test_two_ranks_do_every_photo_once(pipe, tmp_path, monkeypatch):
    """RANK 0 and 1 of WORLD_SIZE 2 (one after the other here): each photo translated once, by one rank; the
    first rank to finish does not finalize, the second does; the images equal one process's."""
    src = yolo_set(tmp_path / "src")
    run_translate(src, tmp_path / "one", pipe=pipe, workers=0)
    out = tmp_path / "two"
    monkeypatch.setenv("WORLD_SIZE", "2")
    cards = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        cards.append(run_translate(src, out, pipe=pipe, workers=0).card)
    assert cards[0] is None and cards[1] == out / "README.md"
    names = manifest_inputs(out)
    assert len(names) == len(set(names)) == 5
    ranks = {p.name: [json.loads(line)["input"] for line in p.read_text().splitlines()]
             for p in state_dir(out).glob("manifest-*.jsonl")}
    assert sorted(map(len, ranks.values())) == [2, 3]
    for rel in names:
        np.testing.assert_allclose(grey(out / rel), grey(tmp_path / "one" / rel), atol=1)  # CPU rounding
    assert (out / "labels" / "train" / "p0.txt").exists()


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing catches it."""


def test_a_killed_run_continues_without_redoing(pipe, tmp_path, monkeypatch):
    src = yolo_set(tmp_path / "src")
    run_translate(src, tmp_path / "whole", pipe=pipe, workers=0)
    out = tmp_path / "out"
    real, written = runner.write_image, []

    def dies_at_the_third(path, *args):
        if len(written) == 2:
            raise Killed()
        written.append(path)
        return real(path, *args)

    monkeypatch.setattr(runner, "write_image", dies_at_the_third)
    with pytest.raises(Killed):
        run_translate(src, out, pipe=pipe, workers=0)
    monkeypatch.setattr(runner, "write_image", real)
    assert len(manifest_inputs(out)) == 2 and not (out / "README.md").exists()
    manifest = next(state_dir(out).glob("manifest-*.jsonl"))
    with open(manifest, "a") as f:
        f.write('{"input": "images/val/p3.jpg", "outp')  # a line cut by the kill: ignored, p3 done again
    again = run_translate(src, out, pipe=pipe, workers=0)
    assert (again.skipped, again.done) == (2, 3)
    names = manifest_inputs(out)
    assert sorted(names) == sorted(set(names)) and len(names) == 5  # each photo once
    assert files_of(out).keys() == files_of(tmp_path / "whole").keys()
    for rel in names:
        np.testing.assert_allclose(grey(out / rel), grey(tmp_path / "whole" / rel), atol=1)
    assert not any(p.name.startswith(".") for p in out.rglob("*") if ".vis2ir" not in p.parts)  # no temporary files


def test_temporaries_of_a_killed_run_are_swept(pipe, tmp_path):
    """A temporary file a kill -9 left (not touched for ABANDONED_S) is removed by the next run; a fresh one, maybe
    another rank's write in progress, is left alone."""
    src, out = yolo_set(tmp_path / "src"), tmp_path / "out"
    run_translate(src, out, pipe=pipe, workers=0)
    old = out / "images" / "train" / ".p0.jpg.tmp-123-0a1b2c3d"
    new = out / "images" / "train" / ".p2.jpg.tmp-456-deadbeef"
    for path in (old, new):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half an image")
    os.utime(old, (1, 1))
    run_translate(src, out, pipe=pipe, workers=0)
    assert not old.exists() and new.exists()


def test_a_bad_photo_under_several_ranks_does_not_stop_the_others(pipe, tmp_path, monkeypatch, caplog):
    """With WORLD_SIZE > 1 a rank with a failed photo logs it and returns (a non-zero exit would make torchrun stop
    the other ranks); the last rank still finalizes without it."""
    src, out = yolo_set(tmp_path / "src"), tmp_path / "out"
    (src / "images" / "train" / "p2.jpg").write_bytes(b"not a jpeg")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        summary = run_translate(src, out, pipe=pipe, workers=0)
    assert "1 of 3 photos failed: images/train/p2.jpg" in caplog.text
    assert summary.card is not None and "images/train/p2.jpg" in summary.card.read_text()


def test_a_finalize_killed_on_this_machine_is_taken_over(pipe, tmp_path):
    src, out = yolo_set(tmp_path / "src"), tmp_path / "out"
    state_dir(out).mkdir(parents=True)
    (state_dir(out) / "finalize.lock").write_text(f"{socket.gethostname()} 999999999")  # no such process
    assert run_translate(src, out, pipe=pipe, workers=0).card == out / "README.md"
    assert not (state_dir(out) / "finalize.lock").exists()


def test_a_bad_photo_is_named_and_left_out(pipe, tmp_path, caplog):
    src, out = yolo_set(tmp_path / "src"), tmp_path / "out"
    (src / "images" / "train" / "p2.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(Vis2IRError, match=r"1 of 5 photos failed: images/train/p2.jpg .*run the same command again"):
        run_translate(src, out, pipe=pipe, workers=0)
    assert (out / "images" / "val" / "p4.jpg").exists() and not (out / "images" / "train" / "p2.jpg").exists()
    assert not (out / "labels" / "train" / "p2.txt").exists()  # no annotation for a missing image
    assert (out / "labels" / "train" / "p0.txt").exists()
    assert "images/train/p2.jpg" in (out / "README.md").read_text()
    done, failed = read_manifests(out)
    assert len(done) == 4 and list(failed) == ["images/train/p2.jpg"]


def test_refusals(pipe, tmp_path):
    src = yolo_set(tmp_path / "src")
    with pytest.raises(Vis2IRError, match="inside the source"):
        run_translate(src, src / "ir", pipe=pipe)
    with pytest.raises(Vis2IRError, match="--bit-depth 16: images/train/p0.jpg .*--format png"):
        run_translate(src, tmp_path / "a", pipe=pipe, bit_depth=16)
    photo(src / "images" / "train" / "p0.png", (40, 32), 0)
    with pytest.raises(Vis2IRError, match="images/train/p0.jpg and images/train/p0.png would both be written as"):
        run_translate(src, tmp_path / "a", pipe=pipe, image_format="png")
    (src / "images" / "train" / "p0.png").unlink()
    out = tmp_path / "b"
    run_translate(src, out, pipe=pipe, workers=0, steps=1)
    with pytest.raises(Vis2IRError, match=r"other settings \(sample.steps 1 -> 2\); finish it with the same"):
        run_translate(src, out, pipe=pipe, workers=0, steps=2)
    with pytest.raises(Vis2IRError, match=r"other settings \(box_classes \[\] -> \['car=truck'\]\)"):
        run_translate(src, out, pipe=pipe, workers=0, steps=1, box_classes=["car=truck"])
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.md").write_text("mine")
    with pytest.raises(Vis2IRError, match="holds other files and no translation"):
        run_translate(src, other, pipe=pipe)
    with pytest.raises(Vis2IRError, match="pass --checkpoint DIR"):
        run_translate(src, tmp_path / "d")
    (src / "classes.txt").write_text("forklift\ncar\n")  # found before any photo is read
    with pytest.raises(Vis2IRError, match="forklift"):
        run_translate(src, tmp_path / "e", pipe=pipe)
    assert not (tmp_path / "e" / ".vis2ir" / "settings.json").exists()
    with pytest.raises(Vis2IRError, match="--semantic none: model.semantic.mode=channel_concat needs"):
        run_translate(src, tmp_path / "c", pipe=pipe, semantic="none")


def test_finalize_refuses_an_unfinished_output(pipe, tmp_path, monkeypatch):
    src, out = yolo_set(tmp_path / "src"), tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    run_translate(src, out, pipe=pipe, workers=0)
    with pytest.raises(Vis2IRError, match=r"--finalize: 2 of 5 photos are not translated yet"):
        run_translate(src, out, pipe=pipe, finalize=True)


def test_two_processes_at_once(config_file, tmp_path):
    """Two processes started together as the two tasks of a SLURM array (scripts/translate_slurm.sh: RANK 0 and 1
    of WORLD_SIZE 2): every photo once, the annotations and the card written once both are done."""
    import subprocess
    import sys

    src, out = yolo_set(tmp_path / "src"), tmp_path / "out"
    script = Path(__file__).resolve().parents[2] / "scripts" / "translate_slurm.sh"
    env = {**os.environ, "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1",
           "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen(["bash", str(script), str(src), "--out", str(out), "--workers", "0", "--config",
                               str(config_file)],
                              env={**env, "SLURM_ARRAY_TASK_ID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    names = manifest_inputs(out)
    assert len(names) == len(set(names)) == 5
    assert sum(o.strip() == str(out / "README.md") for o, _ in results) == 1  # one of them finalized
    assert files_of(out)["labels/val/p4.txt"] == files_of(src)["labels/val/p4.txt"]
    assert sorted(p.name for p in state_dir(out).glob("manifest-*")) == ["manifest-rank00000-of00002.jsonl",
                                                                          "manifest-rank00001-of00002.jsonl"]


def test_cli_translate(config_file, tmp_path, capsys):
    src, out = coco_set(tmp_path / "src"), tmp_path / "out"
    assert main(["translate", str(src), "--out", str(out), "--workers", "0", "--config", str(config_file)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "README.md")
    assert main(["translate", str(src), "--out", str(src / "x"), "--config", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside the source" in err
    assert os.path.exists(out / "train2017" / "000002.jpg")
