"""`vis2ir translate`'s data-set layouts (COCO, YOLO, Pascal VOC, plain): detection, the photos and the keys their
boxes are found by, and carrying the annotations over to the output (unchanged, renamed to PNG, failed photos
left out)."""

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from vis2ir.io.boxes import BoxLabels
from vis2ir.translate.layouts import LAYOUTS, LayoutError, Photo, coco_keys, detect, output_rel

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "real" / "msrs"


def identity(rel: str) -> str:
    return rel


def png(rel: str) -> str:
    return output_rel(rel, "png")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def photo(path: Path, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 90, 160)).save(path)
    return path


def coco(names, boxes=((0, (1, 1, 3, 2), 1),), categories=((1, "person"), (2, "car")), **extra) -> str:
    """A COCO detection file: `names` the images' file_names (ids 0, 1, ...), `boxes` (image id, bbox, category)."""
    return json.dumps({"info": {"year": 2017}, "images": [{"id": i, "file_name": n, "width": 8, "height": 6}
                                                          for i, n in enumerate(names)],
                       "annotations": [{"id": 100 + k, "image_id": i, "bbox": list(b), "category_id": c, "area": 6}
                                       for k, (i, b, c) in enumerate(boxes)],
                       "categories": [{"id": i, "name": n} for i, n in categories], **extra})


def files_under(root: Path, skip=()) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in skip}


def non_photos(layout) -> dict[str, bytes]:
    return files_under(layout.root, {p.rel for p in layout.photos()})


def boxes_found(layout) -> dict[str, int]:
    """rel -> how many boxes `BoxLabels` finds under the photo's key (photos with an annotation source)."""
    opened = [BoxLabels.open(path) for path in layout.labels]
    found = {}
    for p in layout.photos():
        if p.labels >= 0:
            annotation = opened[p.labels].find(p.key)
            assert annotation is not None, p
            found[p.rel] = len(annotation.boxes)
    return found


# ----------------------------------------------------------------------------------------------
# COCO


def coco_set(root: Path) -> Path:
    """COCO 2017's layout: instances_ and captions_ files for the same images, an image no file references."""
    for name in ("000001", "000002", "000003"):
        photo(root / "train2017" / f"{name}.jpg")
    photo(root / "extra" / "unused.png")
    write(root / "README.txt", "COCO sample\n")
    names = ["000001.jpg", "000002.jpg", "000003.jpg"]
    instances = json.loads(coco(names, boxes=[(0, (1, 1, 3, 2), 1), (1, (0, 0, 2, 2), 2), (1, (4, 2, 2, 2), 1)]))
    # written unlike json.dumps' default, so that a file rewritten when nothing changes would differ
    write(root / "annotations" / "instances_train2017.json", json.dumps(instances, indent=1) + "\n")
    write(root / "annotations" / "captions_train2017.json", json.dumps({
        "images": [{"id": i, "file_name": n, "width": 8, "height": 6} for i, n in enumerate(names)],
        "annotations": [{"id": 7, "image_id": 0, "caption": "a person"}, {"id": 8, "image_id": 1, "caption": "cars"}]}))
    return root


def test_coco_photos_once_with_boxes_from_the_instances_file(tmp_path):
    layout = detect(coco_set(tmp_path))
    assert layout.kind == "coco" and layout.root == tmp_path
    assert layout.labels == [tmp_path / "annotations" / "instances_train2017.json"]  # captions: no boxes
    assert layout.photos() == [Photo(f"train2017/00000{k}.jpg", 0, f"00000{k}") for k in (1, 2, 3)]
    assert boxes_found(layout) == {"train2017/000001.jpg": 1, "train2017/000002.jpg": 2, "train2017/000003.jpg": 0}
    line = layout.describe()
    assert line.startswith("COCO: 2 annotation files, 3 photos") and "1 image file" in line and "\n" not in line


def test_coco_round_trip_is_byte_identical_and_leaves_unreferenced_images_out(tmp_path):
    layout = detect(coco_set(tmp_path / "src"))
    written = layout.carry_over(tmp_path / "out", identity, set())
    carried = files_under(tmp_path / "out")
    expected = non_photos(layout)
    del expected["extra/unused.png"]  # an image no COCO file references: neither translated nor copied
    assert carried == expected
    assert sorted(written) == sorted(tmp_path / "out" / rel for rel in expected)


def test_coco_png_output_renames_only_the_file_names(tmp_path):
    layout = detect(coco_set(tmp_path / "src"))
    layout.carry_over(tmp_path / "out", png, set())
    for name in ("instances_train2017.json", "captions_train2017.json"):
        before = json.loads((tmp_path / "src" / "annotations" / name).read_text())
        after = json.loads((tmp_path / "out" / "annotations" / name).read_text())
        assert [i["file_name"] for i in after["images"]] == ["000001.png", "000002.png", "000003.png"]
        for image in before["images"]:
            image["file_name"] = image["file_name"].replace(".jpg", ".png")
        assert after == before
    assert (tmp_path / "out" / "README.txt").read_bytes() == b"COCO sample\n"


def test_coco_failed_photo_loses_its_image_and_annotations(tmp_path):
    layout = detect(coco_set(tmp_path / "src"))
    layout.carry_over(tmp_path / "out", identity, {"train2017/000002.jpg"})
    for name in ("instances_train2017.json", "captions_train2017.json"):
        before = json.loads((tmp_path / "src" / "annotations" / name).read_text())
        after = json.loads((tmp_path / "out" / "annotations" / name).read_text())
        assert [i["file_name"] for i in after["images"]] == ["000001.jpg", "000003.jpg"]
        assert [a["image_id"] for a in after["annotations"]] == [a["image_id"] for a in before["annotations"]
                                                                 if a["image_id"] != 1]
        assert {k: v for k, v in after.items() if k not in ("images", "annotations")} == \
               {k: v for k, v in before.items() if k not in ("images", "annotations")}
    assert len(json.loads((tmp_path / "out" / "annotations" / "instances_train2017.json").read_text())
               ["annotations"]) == 1


def test_flir_like_coco_files_with_a_shared_data_folder(tmp_path):
    out, tmp_path = tmp_path / "out", tmp_path / "src"
    for split, names in (("train", ["video-1", "video-2"]), ("val", ["video-9"])):
        folder = tmp_path / f"images_thermal_{split}"
        for n in names:
            photo(folder / "data" / f"{n}.jpg")
        write(folder / "coco.json", coco([f"data/{n}.jpg" for n in names], boxes=[(0, (1, 1, 2, 2), 2)]))
        write(folder / "index.json", json.dumps({"frames": []}))  # FLIR's other JSON: not COCO, copied
    layout = detect(tmp_path)
    assert layout.kind == "coco"
    assert layout.labels == [tmp_path / f"images_thermal_{split}" / "coco.json" for split in ("train", "val")]
    assert layout.photos() == [Photo("images_thermal_train/data/video-1.jpg", 0, "video-1"),
                               Photo("images_thermal_train/data/video-2.jpg", 0, "video-2"),
                               Photo("images_thermal_val/data/video-9.jpg", 1, "video-9")]
    assert boxes_found(layout) == {"images_thermal_train/data/video-1.jpg": 1,
                                   "images_thermal_train/data/video-2.jpg": 0,
                                   "images_thermal_val/data/video-9.jpg": 1}
    layout.carry_over(out, png, {"images_thermal_train/data/video-2.jpg"})
    after = json.loads((out / "images_thermal_train" / "coco.json").read_text())
    assert [i["file_name"] for i in after["images"]] == ["data/video-1.png"]  # the folder part kept as written
    assert (out / "images_thermal_val" / "index.json").read_text() == '{"frames": []}'


def test_coco_images_under_images_split_folder(tmp_path):
    """instances_val.json in annotations/ with its images in images/val/ (the last place tried)."""
    photo(tmp_path / "images" / "val" / "a.png")
    photo(tmp_path / "images" / "val" / "b.png")
    write(tmp_path / "annotations" / "instances_val.json", coco(["a.png", "b.png"], boxes=[(1, (0, 0, 4, 4), 1)]))
    layout = detect(tmp_path, "coco")
    assert [p.rel for p in layout.photos()] == ["images/val/a.png", "images/val/b.png"]
    assert boxes_found(layout) == {"images/val/a.png": 0, "images/val/b.png": 1}


def test_coco_keys_match_boxlabels_with_and_without_a_shared_folder(tmp_path):
    cases = [["day/a.jpg", "night/a.jpg"], ["data/x.jpg", "data/sub/y.jpg"], ["p.jpg", "q/r.jpg"]]
    for n, names in enumerate(cases):
        file = write(tmp_path / f"c{n}.json", coco(names, boxes=[(i, (0, 0, 1, 1), 1) for i in range(len(names))]))
        labels = BoxLabels.open(file)
        assert sorted(coco_keys(names)) == labels.names()
        assert all(len(labels.find(k).boxes) == 1 for k in coco_keys(names))
    assert coco_keys(["data/x.jpg", "data/sub/y.jpg"]) == ["x", "sub/y"]


def test_coco_missing_images_are_left_out_and_dropped_from_the_output(tmp_path, caplog):
    photo(tmp_path / "src" / "a.jpg")
    photo(tmp_path / "src" / "b.jpg")
    write(tmp_path / "src" / "labels.json", coco(["a.jpg", "b.jpg", "gone.jpg"], boxes=[(2, (0, 0, 1, 1), 1)]))
    layout = detect(tmp_path / "src")
    assert [p.rel for p in layout.photos()] == ["a.jpg", "b.jpg"]
    assert "missing" in layout.describe() and "gone.jpg" in caplog.text
    layout.carry_over(tmp_path / "out", identity, set())
    after = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert [i["file_name"] for i in after["images"]] == ["a.jpg", "b.jpg"] and after["annotations"] == []


def test_coco_file_name_leaving_the_source_is_refused(tmp_path):
    photo(tmp_path / "src" / "a.jpg")
    photo(tmp_path / "b.jpg")
    write(tmp_path / "src" / "labels.json", coco(["a.jpg", "../b.jpg"]))
    with pytest.raises(LayoutError, match=r"\.\./b\.jpg") as err:
        detect(tmp_path / "src")
    assert "\n" not in str(err.value)


def test_coco_images_not_found_is_one_line_naming_the_file(tmp_path):
    write(tmp_path / "annotations" / "instances_x.json", coco(["nowhere.jpg"]))
    with pytest.raises(LayoutError, match="instances_x.json: none of its images") as err:
        detect(tmp_path)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------
# YOLO


def yolo_set(root: Path, yaml_path: str = "../datasets/sample") -> Path:
    for split, names in (("train", ["a", "b"]), ("val", ["c"])):
        for n in names:
            photo(root / "images" / split / f"{n}.jpg")
    write(root / "labels" / "train" / "a.txt", "0 0.5 0.5 0.25 0.25\n1 0.2 0.2 0.1 0.1\n")
    write(root / "labels" / "train" / "b.txt", "2 0.5 0.5 0.5 0.5\n")  # c has no label file: no object
    write(root / "classes.txt", "person\nbicycle\ncar\n")
    write(root / "data.yaml", f"path: {yaml_path}  # dataset root\ntrain: images/train\nval: images/val\n"
                              "names:\n  0: person\n  1: bicycle\n  2: car\n")
    write(root / "train.txt", "./images/train/a.jpg\n./images/train/b.jpg\n")
    return root


def test_yolo_photos_keys_and_boxes(tmp_path):
    layout = detect(yolo_set(tmp_path))
    assert layout.kind == "yolo" and layout.labels == [tmp_path / "labels"]
    assert layout.photos() == [Photo("images/train/a.jpg", 0, "train/a"), Photo("images/train/b.jpg", 0, "train/b"),
                               Photo("images/val/c.jpg", 0, "val/c")]
    labels = BoxLabels.open(layout.labels[0])
    assert [len(labels.find(p.key).boxes) for p in layout.photos()[:2]] == [2, 1]
    assert labels.find("val/c") is None  # no label file: drawn as background
    assert layout.describe() == "YOLO: 3 photos, 2 with a label file in labels/"


def test_yolo_round_trip_png_and_failed(tmp_path):
    layout = detect(yolo_set(tmp_path / "src"))
    layout.carry_over(tmp_path / "same", identity, set())
    expected = non_photos(layout)
    # the relative `path:` (Ultralytics: under its datasets folder, where the photos are) is the output now
    expected["data.yaml"] = expected["data.yaml"].replace(b"../datasets/sample", str(tmp_path / "same").encode())
    assert files_under(tmp_path / "same") == expected

    layout.carry_over(tmp_path / "out", png, {"images/train/b.jpg"})
    expected = non_photos(layout)
    expected["data.yaml"] = expected["data.yaml"].replace(b"../datasets/sample", str(tmp_path / "out").encode())
    del expected["labels/train/b.txt"]
    expected["train.txt"] = b"./images/train/a.png\n"
    assert files_under(tmp_path / "out") == expected


def test_yolo_data_yaml_path_and_absolute_list_lines_move_to_the_output(tmp_path):
    src = tmp_path / "src"
    yolo_set(src, yaml_path=str(src))
    write(src / "val.txt", f"{src}/images/val/c.jpg\r\n{src}/images/train/b.jpg\r\n")
    layout = detect(src)
    out = tmp_path / "out"
    layout.carry_over(out, png, {"images/train/b.jpg"})
    before, after = (src / "data.yaml").read_text().splitlines(), (out / "data.yaml").read_text().splitlines()
    assert after[0] == f"path: {out}  # dataset root" and after[1:] == before[1:]
    assert (out / "val.txt").read_bytes() == f"{out}/images/val/c.png\r\n".encode()


# ----------------------------------------------------------------------------------------------
# Pascal VOC


def voc_xml(name: str, *objects) -> str:
    body = "".join(f"\n\t<object>\n\t\t<name>{n}</name>\n\t\t<bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox>\n\t</object>" for n, a, b, c, d in objects)
    return (f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{name}</filename>\n\t<size><width>8</width>"
            f"<height>6</height><depth>3</depth></size>{body}\n</annotation>\n")


def voc_set(root: Path) -> Path:
    year = root / "VOCdevkit" / "VOC2007"
    for n in ("000001", "000002", "000003"):
        photo(year / "JPEGImages" / f"{n}.jpg")
    write(year / "Annotations" / "000001.xml", voc_xml("000001.jpg", ("person", 1, 1, 4, 4)))
    write(year / "Annotations" / "000002.xml", voc_xml("000002.jpg", ("car", 0, 0, 3, 3), ("dog", 2, 2, 6, 5)))
    write(year / "ImageSets" / "Main" / "trainval.txt", "000001\n000002\n000003\n")
    write(year / "ImageSets" / "Main" / "car_trainval.txt", "000001 -1\n000002  1\n000003 -1\n")
    photo(year / "SegmentationClass" / "000002.png")  # an image, not a photo: copied
    write(root / "VOCdevkit" / "README", "devkit\n")
    return root


def test_voc_devkit_nesting_photos_and_boxes(tmp_path):
    layout = detect(voc_set(tmp_path))
    year = "VOCdevkit/VOC2007"
    assert layout.kind == "voc" and layout.labels == [tmp_path / year / "Annotations"]
    assert layout.photos() == [Photo(f"{year}/JPEGImages/000001.jpg", 0, "000001"),
                               Photo(f"{year}/JPEGImages/000002.jpg", 0, "000002"),
                               Photo(f"{year}/JPEGImages/000003.jpg", -1, "")]  # no XML
    assert boxes_found(layout) == {f"{year}/JPEGImages/000001.jpg": 1, f"{year}/JPEGImages/000002.jpg": 2}
    assert layout.describe() == "Pascal VOC: 1 set (VOCdevkit/VOC2007), 3 photos, 2 with an annotation"


def test_voc_round_trip_png_and_failed(tmp_path):
    layout = detect(voc_set(tmp_path / "src"))
    year = "VOCdevkit/VOC2007"
    layout.carry_over(tmp_path / "same", identity, set())
    assert files_under(tmp_path / "same") == non_photos(layout)

    layout.carry_over(tmp_path / "png", png, set())
    carried, expected = files_under(tmp_path / "png"), non_photos(layout)
    for n in ("000001", "000002"):
        rel = f"{year}/Annotations/{n}.xml"
        before, after = ET.fromstring(expected.pop(rel)), ET.fromstring(carried.pop(rel))
        assert after.findtext("filename") == f"{n}.png"
        before.find("filename").text = f"{n}.png"
        assert ET.tostring(after) == ET.tostring(before)
    assert carried == expected  # nothing else differs

    layout.carry_over(tmp_path / "failed", identity, {f"{year}/JPEGImages/000002.jpg"})
    carried, expected = files_under(tmp_path / "failed"), non_photos(layout)
    for gone in (f"{year}/Annotations/000002.xml", f"{year}/SegmentationClass/000002.png"):
        del expected[gone]
    expected[f"{year}/ImageSets/Main/trainval.txt"] = b"000001\n000003\n"
    expected[f"{year}/ImageSets/Main/car_trainval.txt"] = b"000001 -1\n000003 -1\n"
    assert carried == expected


def test_auto_passes_over_coco_files_whose_images_are_elsewhere(tmp_path, caplog):
    """mmdetection's COCO JSONs of a VOC set (file_names relative to JPEGImages/, not found from annotations/)."""
    out, tmp_path = tmp_path / "out", tmp_path / "src"
    voc_set(tmp_path)
    write(tmp_path / "annotations" / "voc07_trainval.json", coco(["000001.jpg", "000002.jpg"]))
    layout = detect(tmp_path)
    assert layout.kind == "voc" and "not taken as COCO" in caplog.text and "voc07_trainval.json" in caplog.text
    with pytest.raises(LayoutError, match="voc07_trainval.json: none of its images"):
        detect(tmp_path, "coco")
    layout.carry_over(out, identity, set())
    assert (out / "annotations" / "voc07_trainval.json").read_bytes() == \
           (tmp_path / "annotations" / "voc07_trainval.json").read_bytes()


def test_voc_set_at_the_source_itself(tmp_path):
    photo(tmp_path / "JPEGImages" / "x.png")
    write(tmp_path / "Annotations" / "x.xml", voc_xml("x.png", ("person", 0, 0, 2, 2)))
    layout = detect(tmp_path, "voc")
    assert layout.photos() == [Photo("JPEGImages/x.png", 0, "x")] and boxes_found(layout) == {"JPEGImages/x.png": 1}


# ----------------------------------------------------------------------------------------------
# Plain, errors, names


def test_plain_folder_skips_hidden_files_and_carries_nothing(tmp_path):
    photo(tmp_path / "src" / "a.jpg")
    photo(tmp_path / "src" / "sub" / "b.png")
    photo(tmp_path / "src" / ".thumbs" / "c.png")
    write(tmp_path / "src" / "notes.txt", "x\n")
    layout = detect(tmp_path / "src")
    assert layout.kind == "plain" and layout.labels == []
    assert layout.photos() == [Photo("a.jpg", -1, ""), Photo("sub/b.png", -1, "")]
    assert layout.carry_over(tmp_path / "out", png, set()) == [] and not (tmp_path / "out").exists()
    assert layout.describe() == "plain folder: 2 photos, no annotations"


@pytest.mark.parametrize("kind, missing", [("coco", "COCO annotation file"), ("yolo", "images/ folder"),
                                           ("voc", "JPEGImages/ and Annotations/")])
def test_explicit_kind_that_does_not_fit_names_what_is_missing(tmp_path, kind, missing):
    yolo_set(tmp_path) if kind != "yolo" else voc_set(tmp_path)
    with pytest.raises(LayoutError, match=missing) as err:
        detect(tmp_path, kind)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_auto_order_prefers_coco_then_yolo_then_voc(tmp_path):
    voc_set(tmp_path / "both")
    yolo_set(tmp_path / "both")
    assert detect(tmp_path / "both").kind == "yolo"
    assert detect(tmp_path / "both", "voc").kind == "voc"


@pytest.mark.parametrize("kind", ["auto", "plain", "yolo"])
def test_no_photos_is_a_layout_error(tmp_path, kind):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(LayoutError, match="no photos") as err:
        detect(tmp_path, kind)
    assert str(tmp_path) in str(err.value)


def test_bad_source_or_kind(tmp_path):
    with pytest.raises(LayoutError, match="no such folder"):
        detect(tmp_path / "absent")
    with pytest.raises(LayoutError, match="expected one of auto, coco, yolo, voc, plain"):
        detect(tmp_path, "kitti")
    assert LAYOUTS == ("auto", "coco", "yolo", "voc", "plain")


def test_output_inside_the_source_is_not_carried_again(tmp_path):
    layout = detect(yolo_set(tmp_path))
    first = layout.carry_over(tmp_path / "ir", identity, set())
    second = layout.carry_over(tmp_path / "ir", identity, set())
    assert sorted(first) == sorted(second) and not (tmp_path / "ir" / "ir").exists()


def test_output_rel():
    assert output_rel("train/a.jpg", "source") == "train/a.jpg"
    assert output_rel("train/a.b.JPG", "png") == "train/a.b.png"
    with pytest.raises(Exception, match="expected one of source, png"):
        output_rel("a.jpg", "tiff")


@pytest.mark.skipif(not REAL.is_dir(), reason="the real MSRS pairs (../shared/real/msrs) are not here")
def test_msrs_visible_is_a_plain_folder():
    """MSRS (visible/ + infrared/ + labels/) is none of the labelled layouts: its visible folder is plain."""
    layout = detect(REAL / "visible")
    assert layout.kind == "plain" and len(layout.photos()) == 361
    assert all(p.rel.startswith(("train/", "test/")) and p.rel.endswith(".jpg") for p in layout.photos())
    assert os.path.samefile(layout.root, REAL / "visible")
