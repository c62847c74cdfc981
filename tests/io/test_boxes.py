"""Detection boxes as a semantic source (issue 28): the four formats, the mapping of their class names to the
palette, the painting of maps, sample-name matching, and one-line errors for malformed files."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vis2ir.io.boxes import BACKGROUND, Annotation, Box, BoxError, BoxLabels, class_counts, draw
from vis2ir.palette import CLASS_IDS, VOID, decode

PERSON, BICYCLE, CAR = CLASS_IDS["person"], CLASS_IDS["bicycle"], CLASS_IDS["car"]
REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "real" / "msrs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def voc(*objects, size=(200, 100)) -> str:
    """A Pascal VOC file: `objects` are (name, xmin, ymin, xmax, ymax)."""
    head = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    body = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{a}</xmin><ymin>{b}</ymin>"
                   f"<xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>" for n, a, b, c, d in objects)
    return f"<annotation><filename>x.jpg</filename>{head}{body}</annotation>"


def coco(images, annotations, categories=((1, "person"), (2, "car"))) -> str:
    return json.dumps({"images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
                       "annotations": [{"id": k, "image_id": i, "bbox": list(b), "category_id": c, "area": 1}
                                       for k, (i, b, c) in enumerate(annotations)],
                       "categories": [{"id": i, "name": n} for i, n in categories]})


def classes(rgb: np.ndarray) -> np.ndarray:
    return decode(rgb)[0]


def one_line(err: pytest.ExceptionInfo, *named) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for part in named:
        assert str(part) in message, message
    return message


# ----------------------------------------------------------------------------------------------
# The formats


def test_yolo_with_id_name_classes_file_two_folders_up(tmp_path):
    write(tmp_path / "labels" / "classes.txt", "0 person\n1 bicycle\n2 car\n")
    write(tmp_path / "labels" / "visible" / "train" / "a.txt", "0 0.5 0.5 0.5 0.5\n2 0.1 0.1 0.1 0.1\n")
    write(tmp_path / "labels" / "visible" / "test" / "b.txt", "")
    labels = BoxLabels.open(tmp_path / "labels" / "visible" / "train")
    assert labels.layout == "yolo" and labels.class_file == tmp_path / "labels" / "classes.txt"
    labels = BoxLabels.open(tmp_path / "labels" / "visible")
    assert labels.names() == ["test/b", "train/a"]
    a = labels.find("train/a")
    assert [(b.label, b.class_id) for b in a.boxes] == [("person", PERSON), ("car", CAR)]
    assert a.size == (1.0, 1.0) and a.source == tmp_path / "labels" / "visible" / "train" / "a.txt"
    assert labels.find("test/b").boxes == ()  # an empty file: no object annotated
    got = classes(labels.draw(a, 100, 80))
    assert got[40, 50] == PERSON and got[8, 10] == CAR and got[79, 99] == BACKGROUND
    assert (got[20:60, 25:75] == PERSON).all() and (got[19, 25:75] == BACKGROUND).all()


def test_yolo_plain_names_and_data_yaml_names(tmp_path):
    write(tmp_path / "plain" / "classes.txt", "person\ntraffic light\ncar\n")
    write(tmp_path / "plain" / "x.txt", "1 0.5 0.5 0.2 0.2\n2 0.5 0.5 0.4 0.4\n")
    assert [b.class_id for b in BoxLabels.open(tmp_path / "plain").find("x").boxes] == [
        CLASS_IDS["traffic light"], CAR]
    write(tmp_path / "listed" / "data.yaml", "path: .\nnames: [car, people]\n")
    write(tmp_path / "listed" / "labels" / "x.txt", "1 0.5 0.5 0.2 0.2\n")
    assert BoxLabels.open(tmp_path / "listed" / "labels").find("x").boxes[0].class_id == PERSON
    write(tmp_path / "mapped" / "dataset.yaml", "names:\n  0: bike\n  3: motor\n")
    write(tmp_path / "mapped" / "x.txt", "3 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.1 0.1\n")
    assert [b.class_id for b in BoxLabels.open(tmp_path / "mapped").find("x").boxes] == [
        CLASS_IDS["motorcycle"], BICYCLE]


def test_yolo_without_class_names_maps_ids_by_the_setting(tmp_path):
    root = tmp_path / "a" / "b" / "c" / "labels"  # classes.txt three folders up is not looked at
    write(tmp_path / "a" / "classes.txt", "person\ncar\n")
    write(root / "x.txt", "0 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1\n")
    labels = BoxLabels.open(root)
    assert labels.class_file is None
    with pytest.raises(BoxError) as err:
        labels.find("x")
    one_line(err, root / "x.txt", "'0'", "data.box_classes", "0=CLASS", "0=ignore")
    mapped = BoxLabels.open(root, class_map=["0=car", "1=ignore"]).find("x")
    assert [(b.label, b.class_id) for b in mapped.boxes] == [("0", CAR)]


def test_coco_file_or_folder_scaled_from_the_annotated_size(tmp_path):
    text = coco([(7, "images/a.jpg", 200, 100), (8, "b.png", 64, 64)], [(7, (20, 10, 40, 20), 1)])
    path = write(tmp_path / "ann" / "instances.json", text)
    for labels in (BoxLabels.open(path), BoxLabels.open(tmp_path / "ann")):
        assert labels.layout == "coco" and labels.path == path and labels.names() == ["b", "images/a"]
    a = labels.find("images/a")
    assert a is labels.find("a") and a.size == (200, 100)
    assert labels.find("b").boxes == ()  # an image without annotations: zero boxes
    assert labels.find("c") is None and labels.find("train/a") is None
    assert labels.source("a") == path and labels.has("b") and labels.source("c") is None
    got = classes(labels.draw(a, 100, 50))  # half the annotated size: the box is x 10..30, y 5..15
    assert (got[5:15, 10:30] == PERSON).all()
    assert (got[4] == BACKGROUND).all() and (got[15] == BACKGROUND).all()
    assert (got[:, 9] == BACKGROUND).all() and (got[:, 30] == BACKGROUND).all()


def test_coco_polygons_are_drawn_as_their_shapes(tmp_path):
    """An annotation with a polygon segmentation paints the object's outline, not its box; an RLE mask, its box."""
    data = json.loads(coco([(1, "a.jpg", 40, 40)], [(1, (0, 0, 40, 40), 1), (1, (20, 0, 20, 20), 2)]))
    data["annotations"][0]["segmentation"] = [[0, 0, 40, 0, 0, 40]]  # the upper-left triangle of the box
    data["annotations"][1]["segmentation"] = {"size": [40, 40], "counts": "abc"}  # RLE: drawn as the box
    labels = BoxLabels.open(write(tmp_path / "instances.json", json.dumps(data)))
    got = classes(labels.draw(labels.find("a"), 40, 40))
    assert got[5, 5] == PERSON and got[35, 35] == BACKGROUND and got[30, 2] == PERSON and got[2, 30] == CAR
    assert got[25, 25] == BACKGROUND  # inside the box, outside the triangle (x + y > 40)
    assert (got == PERSON).sum() == pytest.approx(40 * 40 / 2 - 20 * 20 / 2, rel=0.1)  # the triangle less the car's box


def test_voc_folder_paints_large_boxes_first(tmp_path):
    # the small person first in the file: painting in file order (or smallest first) would hide it under the car
    write(tmp_path / "Annotations" / "010001.xml", voc(("person", 50, 20, 70, 60), ("car", 0, 0, 200, 100),
                                                       ("car", 40, 10, 90, 80)))
    labels = BoxLabels.open(tmp_path)
    assert labels.layout == "voc" and labels.names() == ["Annotations/010001"]
    a = labels.find("visible/010001")  # neither name ends the other: no match
    assert a is None
    a = labels.find("010001")
    got, shades = decode(labels.draw(a, 400, 200))
    assert (got[40:120, 100:140] == PERSON).all()
    assert got[150, 300] == CAR and got[30, 160] == CAR
    assert shades[150, 300] == 0 and shades[30, 160] == 1  # the big car is instance 0, the smaller one 1
    assert class_counts(a) == {PERSON: 1, CAR: 2}


def test_voc_without_size_draws_in_the_photo_pixels(tmp_path):
    write(tmp_path / "x.xml", voc(("person", 10, 10, 20, 20), size=None))
    a = BoxLabels.open(tmp_path).find("x")
    assert a.size is None
    assert classes(draw(a, 40, 40))[15, 15] == PERSON
    assert classes(draw(a, 20, 20, photo_size=(40, 40)))[7, 7] == PERSON
    assert classes(draw(a, 20, 20, photo_size=(40, 40)))[12, 12] == BACKGROUND


def test_kaist_names_and_pixel_boxes(tmp_path):
    text = ("% bbGt version=3\nperson 10 20 30 40 0 0 0 0 0 0 0\npeople 100 20 30 40 0 0 0 0 0 0 0\n"
            "person? 200 20 30 40 0 0 0 0 0 0 0\ncyclist 300 20 30 40 0 0 0 0 0 0 0\n")
    write(tmp_path / "set00" / "V000" / "I00000.txt", text)
    write(tmp_path / "set00" / "V000" / "I00001.txt", "% bbGt version=3\n")
    labels = BoxLabels.open(tmp_path)
    assert labels.layout == "kaist"
    a = labels.find("set00/V000/I00000")
    assert [b.class_id for b in a.boxes] == [PERSON] * 4 and a.size is None
    assert (a.boxes[0].x0, a.boxes[0].y0, a.boxes[0].x1, a.boxes[0].y1) == (10, 20, 40, 60)
    got = classes(draw(a, 640, 512))
    assert (got[20:60, 10:40] == PERSON).all() and got[19, 10] == BACKGROUND and got[20, 40] == BACKGROUND
    assert classes(draw(a, 320, 256, photo_size=(640, 512)))[10:30, 5:20].tolist() == [[PERSON] * 15] * 20
    assert labels.find("I00001").boxes == ()


# ----------------------------------------------------------------------------------------------
# Painting


def test_outside_the_boxes_is_declared_background_not_void():
    empty = draw(Annotation((), (1.0, 1.0), Path("x.txt")), 8, 6)
    assert empty.shape == (6, 8, 3) and empty.dtype == np.uint8
    assert (classes(empty) == BACKGROUND).all() and BACKGROUND != VOID and empty.any(-1).all()


def test_instances_are_shaded_in_painting_order_things_only():
    boxes = (Box("person", PERSON, 0, 0, 2, 2), Box("person", PERSON, 10, 0, 20, 10),
             Box("person", PERSON, 30, 0, 35, 5), Box("lamp", CLASS_IDS["light"], 0, 20, 10, 30),
             Box("lamp", CLASS_IDS["light"], 20, 20, 25, 25))
    got, shades = decode(draw(Annotation(boxes, None, Path("x")), 40, 40))
    assert got[1, 1] == got[5, 15] == got[2, 32] == PERSON
    assert (shades[5, 15], shades[2, 32], shades[1, 1]) == (0, 1, 2)  # largest first
    assert got[25, 5] == got[22, 22] == CLASS_IDS["light"] and shades[25, 5] == shades[22, 22] == 0  # stuff


def test_boxes_are_clipped_and_at_least_one_pixel():
    boxes = (Box("car", CAR, -5, -5, 3, 3), Box("person", PERSON, 7.1, 7.2, 7.1, 7.2),
             Box("bicycle", BICYCLE, 20, 20, 30, 30))  # the bicycle lies wholly outside
    got = classes(draw(Annotation(boxes, None, Path("x")), 10, 10))
    assert (got[:3, :3] == CAR).all() and got[3, 3] == BACKGROUND
    assert got[7, 7] == PERSON and (got == PERSON).sum() == 1
    assert (got != BICYCLE).all()


# ----------------------------------------------------------------------------------------------
# Names, mapping, errors


def test_sample_names_match_exactly_or_by_an_unshared_end(tmp_path):
    for key in ("train/a", "test/b", "c", "train/d", "test/d"):
        write(tmp_path / f"{key}.txt", "0 0.5 0.5 0.1 0.1\n")
    labels = BoxLabels.open(tmp_path, class_map=["0=person"])
    assert labels.find("train/a").source == tmp_path / "train" / "a.txt"
    assert labels.find("a").source == tmp_path / "train" / "a.txt"  # a flat sample, a unique bare name
    assert labels.find("visible/train/a").source == tmp_path / "train" / "a.txt"
    assert labels.find("val/c").source == tmp_path / "c.txt"  # flat annotations
    assert labels.find("test/a") is None and labels.find("zz") is None  # another split's file is not taken
    assert labels.has("a") and not labels.has("test/a")
    assert labels.source("val/c") == tmp_path / "c.txt" and labels.source("zz") is None
    assert (classes(labels.draw(None, 4, 3)) == BACKGROUND).all()  # no annotation: background only
    assert labels.find("train/d").source == tmp_path / "train" / "d.txt"
    for look_up in (labels.find, labels.has, labels.source):
        with pytest.raises(BoxError) as err:
            look_up("d")
        one_line(err, tmp_path, "train/d", "test/d")


def test_files_are_read_on_first_use_and_kept(tmp_path):
    write(tmp_path / "good.txt", "0 0.5 0.5 0.1 0.1\n")
    bad = write(tmp_path / "bad.txt", "0 0.5 0.5\n")
    labels = BoxLabels.open(tmp_path, class_map=["0=person"])  # the bad file is not read yet
    first = labels.find("good")
    (tmp_path / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    assert labels.find("good") is first
    with pytest.raises(BoxError) as err:
        labels.find("bad")
    one_line(err, bad, "line 1")
    copy = pickle.loads(pickle.dumps(labels))  # loader workers get a copy, cache included
    assert copy.find("good").boxes == first.boxes and copy.layout == "yolo"


def test_ignore_and_unmapped_names_name_the_setting(tmp_path):
    write(tmp_path / "x.xml", voc(("sign", 10, 10, 50, 50), ("person", 60, 10, 90, 50)))
    with pytest.raises(BoxError) as err:
        BoxLabels.open(tmp_path, setting="--box-classes").find("x")
    one_line(err, tmp_path / "x.xml", "'sign'", "--box-classes", "sign=CLASS", "sign=ignore")
    a = BoxLabels.open(tmp_path, class_map=["Sign = ignore"]).find("x")
    assert [b.label for b in a.boxes] == ["person"] and (classes(draw(a, 200, 100))[20:40, 20:40] == BACKGROUND).all()
    a = BoxLabels.open(tmp_path, class_map=["sign=stop sign", "person=ignore"]).find("x")
    assert [b.class_id for b in a.boxes] == [CLASS_IDS["stop sign"]]
    for entry in (["sign"], ["=person"], ["sign=signpost"], ["sign=person", "sign=car"]):
        with pytest.raises(BoxError) as err:
            BoxLabels.open(tmp_path, class_map=entry, setting="--box-classes")
        one_line(err, "--box-classes")


def test_coco_unmapped_category_is_found_at_open(tmp_path):
    path = write(tmp_path / "a.json", coco([(1, "a.jpg", 10, 10)], [(1, (0, 0, 5, 5), 3)], [(3, "sign")]))
    with pytest.raises(BoxError) as err:
        BoxLabels.open(path, setting="data.box_classes")
    one_line(err, path, "'sign'", "data.box_classes")


MALFORMED = {
    "yolo: four fields": ("x.txt", "0 0.5 0.5 0.1\n", "line 1"),
    "yolo: not a number": ("x.txt", "0 0.5 0.5 0.1 0.1\n0 0.5 abc 0.1 0.1\n", "line 2"),
    "yolo: negative size": ("x.txt", "0 0.5 0.5 -0.1 0.1\n", "line 1"),
    "yolo: pixels": ("x.txt", "0 320 240 50 60\n", "[0, 1]"),
    "yolo: class not an id": ("x.txt", "person 0.5 0.5 0.1 0.1\n", "line 1"),
    "yolo: class not in classes.txt": ("x.txt", "\n\n3 0.5 0.5 0.1 0.1\n", "line 3"),
    "kaist: few fields": ("x.txt", "% bbGt version=3\nperson 1 2 3\n", "line 2"),
    "kaist: negative": ("x.txt", "% bbGt version=3\nperson 1 2 -3 4\n", "line 2"),
    "voc: bad xml": ("x.xml", "<annotation><object>", "XML"),
    "voc: another root": ("x.xml", "<svg></svg>", "<annotation>"),
    "voc: inverted": ("x.xml", voc(("person", 50, 10, 40, 20)), "xmax"),
    "voc: no bndbox": ("x.xml", "<annotation><object><name>person</name></object></annotation>", "bndbox"),
    "voc: bad size": ("x.xml", voc(size=("wide", 10)), "size"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_folder_files_are_one_line_naming_the_file(tmp_path, case):
    name, text, said = MALFORMED[case]
    write(tmp_path / "classes.txt", "person\ncar\n")
    path = write(tmp_path / "sub" / name, text)
    with pytest.raises(BoxError) as err:
        BoxLabels.open(tmp_path).find("sub/x")
    one_line(err, path, said)


COCO_MALFORMED = {
    "not json": ("{images: []", "JSON"),
    "not coco": (json.dumps([{"images": []}]), "categories"),
    "negative box": (coco([(1, "a.jpg", 10, 10)], [(1, (0, 0, -5, 5), 1)]), "annotations[0]"),
    "short bbox": (coco([(1, "a.jpg", 10, 10)], [(1, (0, 0, 5), 1)]), "bbox has 3 values; expected 4"),
    "unknown category": (coco([(1, "a.jpg", 10, 10)], [(1, (0, 0, 5, 5), 9)]), "category_id 9 is not"),
    "unknown image": (coco([(1, "a.jpg", 10, 10)], [(4, (0, 0, 5, 5), 1)]), "image_id 4 is not"),
    "image without size": (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [],
                                       "categories": []}), "images[0]"),
    "two images of a name": (coco([(1, "a.jpg", 10, 10), (2, "a.jpg", 10, 10)], []), "a.jpg"),
}


@pytest.mark.parametrize("case", COCO_MALFORMED)
def test_malformed_coco_is_one_line_naming_the_file(tmp_path, case):
    text, said = COCO_MALFORMED[case]
    path = write(tmp_path / "instances.json", text)
    with pytest.raises(BoxError) as err:
        BoxLabels.open(path)
    one_line(err, path, said)


def test_paths_that_hold_no_annotations_name_the_formats(tmp_path):
    write(tmp_path / "two" / "a.json", "{}")
    write(tmp_path / "two" / "b.json", "{}")
    write(tmp_path / "images" / "a.jpg", "")
    write(tmp_path / "one.txt", "0 0.5 0.5 0.1 0.1\n")
    for path in (tmp_path / "missing", tmp_path / "two", tmp_path / "images", tmp_path / "one.txt"):
        with pytest.raises(BoxError) as err:
            BoxLabels.open(path)
        one_line(err, path, "COCO", "YOLO", "VOC", "KAIST")


def test_importable_and_usable_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from pathlib import Path\n"
            "from vis2ir.io.boxes import Annotation, Box, draw\n"
            "print(draw(Annotation((Box('person', 0, 0, 0, 1, 1),), (2, 2), Path('x')), 2, 2)[0, 0].tolist())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[231, 21, 63]"


# ----------------------------------------------------------------------------------------------
# The real MSRS labels


@pytest.mark.skipif(not REAL.is_dir(), reason="the real MSRS pairs (../shared/real/msrs) are not here")
def test_msrs_visible_labels_read_and_draw():
    labels = BoxLabels.open(REAL / "labels" / "visible")
    assert labels.layout == "yolo" and labels.class_file == REAL / "labels" / "classes.txt"
    names = labels.names()
    assert len(names) == 361 and all(n.split("/")[0] in ("train", "test") for n in names)
    found = [labels.find(n) for n in names]
    assert sum(not a.boxes for a in found) == 89  # night scenes annotated with nothing on the photo
    assert set().union(*(class_counts(a) for a in found)) == {PERSON, BICYCLE, CAR}
    # a sample whose smallest box (painted last) is a person: its centre is person, most of the map background
    for name, a in zip(names, found):
        if a.boxes and min(a.boxes, key=lambda b: (b.x1 - b.x0) * (b.y1 - b.y0)).class_id == PERSON:
            break
    box = min(a.boxes, key=lambda b: (b.x1 - b.x0) * (b.y1 - b.y0))
    got = classes(labels.draw(labels.find(name.split("/")[1]), 640, 480))
    assert got[int((box.y0 + box.y1) / 2 * 480), int((box.x0 + box.x1) / 2 * 640)] == PERSON
    assert (got == BACKGROUND).mean() > 0.5 and (got == VOID).sum() == 0


def test_coco_names_without_the_folder_every_file_name_shares(tmp_path):
    """FLIR's COCO files name images `data/NAME.jpg`: that shared folder is not part of the names, so photos in
    split folders (`test/NAME`) find their boxes; names in different folders keep them."""
    flir = write(tmp_path / "flir.json", coco([(1, "data/a1.jpg", 10, 10), (2, "data/b2.jpg", 10, 10)],
                                              [(1, (0, 0, 5, 5), 1)]))
    labels = BoxLabels.open(flir)
    assert labels.names() == ["a1", "b2"] and labels.has("test/a1") and len(labels.find("test/a1").boxes) == 1
    mixed = write(tmp_path / "mixed.json", coco([(1, "train/a1.jpg", 10, 10), (2, "test/b2.jpg", 10, 10)], []))
    labels = BoxLabels.open(mixed)
    assert labels.names() == ["test/b2", "train/a1"] and not labels.has("test/a1")  # no split crossing
