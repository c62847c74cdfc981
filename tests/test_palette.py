import numpy as np
import torch

from vis2ir import palette


def test_coco_classes_first_in_panoptic_order_then_synthetic_extras():
    names = palette.CLASS_NAMES
    assert palette.NUM_COCO_CLASSES == 133
    assert names[0] == "person" and names[2] == "car" and names[79] == "toothbrush"
    assert names[80] == "banner" and names[119] == "sky-other-merged" and names[132] == "rug-merged"
    assert names[133:] == ("statue", "car-running", "background")  # appended: earlier ids never move
    assert len(set(names)) == len(names)


def test_base_colours_are_fixed_distinct_and_leave_black_and_white_void():
    assert palette.BASE_COLOURS[palette.class_id("person")].tolist() == [231, 21, 63]
    assert palette.BASE_COLOURS[palette.class_id("car")].tolist() == [21, 21, 147]
    cells = {tuple(c) for c in (palette.BASE_COLOURS // palette.CELL).tolist()}
    assert len(cells) == palette.NUM_CLASSES  # one lattice cell per class
    classes, _ = palette.decode(np.array([[0, 0, 0], [255, 255, 255]], np.uint8))
    assert classes.tolist() == [palette.VOID, palette.VOID]


def test_every_class_and_instance_shade_is_unique_and_decodes_back():
    classes = np.repeat(np.arange(palette.NUM_CLASSES), 27)
    instances = np.tile(np.arange(27), palette.NUM_CLASSES)
    rgb = palette.colourise(classes, instances)
    assert len({tuple(c) for c in rgb.tolist()}) == len(rgb)  # no collisions at all
    got_classes, got_shades = palette.decode(rgb)
    assert (got_classes == classes).all() and (got_shades == instances).all()
    assert (palette.colourise(np.array([palette.VOID])) == 0).all()


def test_decoding_survives_compression_noise():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, palette.NUM_CLASSES, 5000)
    instances = rng.integers(0, 27, 5000)
    noisy = palette.colourise(classes, instances).astype(int) + rng.integers(-6, 7, (5000, 3))
    got_classes, got_shades = palette.decode(np.clip(noisy, 0, 255).astype(np.uint8))
    assert (got_classes == classes).all() and (got_shades == instances).all()


def test_decode_classes_from_a_float_semantic_panel():
    classes = torch.tensor([[0, 2], [palette.VOID, 134]])
    rgb = torch.from_numpy(palette.colourise(classes.numpy(), np.ones((2, 2), int))).permute(2, 0, 1) / 255
    assert torch.equal(palette.decode_classes(rgb), classes)
    assert torch.equal(palette.decode_classes(rgb[None]), classes[None])  # batched


def test_declared_background_is_stuff_and_rgbt_category_names_map():
    background = palette.class_id("background")
    assert background == 135 and background not in palette.THING_IDS
    assert palette.BASE_COLOURS[background].tolist() == [147, 147, 105]
    assert palette.decode(palette.colourise(np.array([background])))[0].tolist() == [background]
    person = palette.class_id("person")
    for name in ("people", "Pedestrian", "cyclist", "person?", "People?"):  # KAIST, FLIR ADAS, M3FD spellings
        assert palette.class_for_label(name) == person, name
    assert palette.class_for_label("motor") == palette.class_id("motorcycle")
    assert palette.class_for_label("hydrant") == palette.class_id("fire hydrant")
    assert palette.class_for_label("what?") == palette.VOID
