"""The `data:` section of the settings: where the triptychs come from and how they are shaped. Each field's
comment is its meaning (`vis2ir config show`), its annotation its roles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from vis2ir.config.checks import check, check_seed
from vis2ir.config.roles import DATA, LATENT, NO_ROLE, RESUMABLE

# The panoptic segmenter of `vis2ir segment`, `--semantic auto` and `data.semantic_source: auto`.
DEFAULT_SEGMENTER = "facebook/mask2former-swin-large-coco-panoptic"


@dataclass
class DataConfig:
    """Where the triptychs come from and how they are shaped (owned by the data package; docs/data.md).

    `source`: 'thermalscenes' (synthetic, in memory), a folder in a known layout, parquet file(s) or a
    glob, a `datasets` folder or Hub id. `layout` names the layout when detection should not guess.
    `semantic_source: auto` makes missing semantic maps of a folder source with `segment_model` and
    caches them in `<source>/semantic_auto/` (docs/segmentation.md).
    """

    # thermalscenes, a folder in a known layout, parquet file(s) or a glob, a datasets folder or Hub id
    source: Annotated[str, DATA] = "thermalscenes"
    # the folder or table layout; auto: detected from the folder's shape (docs/data.md)
    layout: Annotated[Literal["auto", "table", "triptych", "paired", "llvip", "flir", "m3fd", "msrs", "kaist"],
                      LATENT, DATA] = "auto"
    # panel size in pixels, a multiple of 16: the side of a square panel; with bucket, panels of about size² pixels
    size: Annotated[int, LATENT] = 512
    # bucket: the nearest of shapes of about size² pixels at the image's aspect ratio (one shape per batch);
    # or a square panel: resize (aspect not kept), center_crop, or random_crop (training only)
    resize_policy: Annotated[Literal["bucket", "resize", "center_crop", "random_crop"], LATENT] = "center_crop"
    # bucket: the longest side of a bucket is at most this times its shortest
    max_aspect: Annotated[float, LATENT] = 2.0
    hflip: Annotated[bool, LATENT] = True  # mirror half of the training samples at random (all panels alike)
    visible_column: Annotated[str, LATENT, DATA] = "visible"  # table sources: the visible image's column
    infrared_column: Annotated[str, LATENT, DATA] = "infrared"  # table sources: the infrared image's column
    semantic_column: Annotated[str, LATENT, DATA] = "panoptic_img"  # table sources: the semantic map's column
    # table sources: the column of [visible | infrared | semantic] images
    triptych_column: Annotated[str, LATENT, DATA] = "triptych"
    name_column: Annotated[str, DATA] = "name"  # table sources: the column of sample names (else row numbers)
    # folder sources: the folder of semantic maps, <semantic_dir>/<name>.png
    semantic_dir: Annotated[str, LATENT, DATA] = "semantic"
    # files: maps from semantic_dir; auto: missing ones made by segment_model, cached in semantic_auto/;
    # boxes: maps drawn from the detection boxes in data.boxes (outside every box: the background class)
    semantic_source: Annotated[Literal["files", "auto", "boxes"], LATENT, DATA] = "files"
    # semantic_source boxes: YOLO txt folder (+ classes.txt), Pascal VOC xml folder, KAIST txt folder or a COCO json
    boxes: Annotated[str | None, LATENT, DATA] = None
    # semantic_source boxes: category names mapped to palette classes, NAME=CLASS (CLASS a palette name or ignore)
    box_classes: Annotated[tuple[str, ...], LATENT, DATA] = ()
    # panoptic segmenter for semantic_source: auto (Hub id or local folder)
    segment_model: Annotated[str, LATENT, DATA] = DEFAULT_SEGMENTER
    # 16-bit / float infrared to [0, 1]: percentile (per image), minmax (per image), fixed (ir_range)
    ir_normalize: Annotated[Literal["percentile", "minmax", "fixed"], LATENT] = "percentile"
    # percentile: the low and high percentiles mapped to 0 and 1
    ir_percentiles: Annotated[tuple[float, float], LATENT] = (1.0, 99.0)
    ir_range: Annotated[tuple[float, float], LATENT] = (0.0, 65535.0)  # fixed: the raw values mapped to 0 and 1
    # share of samples without an official split that go to val (carved from train when none)
    val_fraction: Annotated[float, DATA] = 0.05
    test_fraction: Annotated[float, DATA] = 0.05  # share of samples without an official split that go to test
    # error: stop at the first bad sample; skip: warn and leave it out
    on_bad_sample: Annotated[Literal["error", "skip"], NO_ROLE] = "error"
    synth_count: Annotated[int, DATA] = 1000  # thermalscenes: number of scenes (split by name hash)
    synth_seed: Annotated[int, LATENT, DATA] = 0  # thermalscenes: seed of the scene set
    # thermalscenes: render the training scenes once before the loader workers start
    synth_prerender: Annotated[bool, RESUMABLE] = False
    # a folder made by `vis2ir data cache`: train from its latents, skipping the codec
    latent_cache: Annotated[str | None, NO_ROLE] = None
    num_workers: Annotated[int, RESUMABLE] = 2  # DataLoader worker processes (0: load in the main process)

    def validate(self) -> None:
        check(self.size >= 16 and self.size % 16 == 0, "data.size", "a multiple of 16", self.size)
        check(1.0 <= self.max_aspect <= 8.0, "data.max_aspect", "a number from 1 to 8", self.max_aspect)
        check(self.num_workers >= 0, "data.num_workers", "an integer >= 0", self.num_workers)
        lo, hi = self.ir_percentiles
        check(0.0 <= lo < hi <= 100.0, "data.ir_percentiles", "two numbers 0 <= low < high <= 100",
              list(self.ir_percentiles))
        check(self.ir_range[0] < self.ir_range[1], "data.ir_range", "two numbers low < high", list(self.ir_range))
        check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "a number in [0, 1)", self.val_fraction)
        check(0.0 <= self.test_fraction < 1.0 - self.val_fraction, "data.test_fraction",
              "a number in [0, 1 - val_fraction)", self.test_fraction)
        check(self.synth_count >= 1, "data.synth_count", "an integer >= 1", self.synth_count)
        check_seed(self.synth_seed, "data.synth_seed")
        check(bool(self.segment_model.strip()), "data.segment_model", "a Hub id or a local folder",
              self.segment_model)
        check(self.semantic_source != "boxes" or bool(self.boxes), "data.boxes",
              "a folder of box label files or a COCO json file with data.semantic_source=boxes", self.boxes)
        check(self.boxes is None or self.semantic_source == "boxes", "data.boxes",
              "null unless data.semantic_source=boxes (the maps are then drawn from these boxes)", self.boxes)
