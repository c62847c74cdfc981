"""Data: paired visible/infrared(/semantic) sources, the training dataset, ThermalScenes, the palette.

Entry points: `build_dataset(cfg.data, split)` for any source, `make_loader` / `collate` to batch it,
`ThermalScenes` for synthetic scenes in memory, `write_thermalscenes` and `inspect_source` behind
`vis2ir data synth` and `vis2ir data inspect`. Layouts and settings: docs/data.md.
"""

from vis2ir.data.dataset import PanelDataset, build_dataset, collate, make_loader, open_source
from vis2ir.data.errors import DataError
from vis2ir.data.inspect import contact_sheet, inspect_source
from vis2ir.palette import CLASS_NAMES, NUM_CLASSES, VOID, class_id, colourise, decode, decode_classes
from vis2ir.data.splits import SPLITS
from vis2ir.data.synth import ThermalScenes, write_thermalscenes
from vis2ir.data.thermalscenes import Scene, render_scene

__all__ = [
    "CLASS_NAMES", "NUM_CLASSES", "SPLITS", "VOID", "DataError", "PanelDataset", "Scene", "ThermalScenes",
    "build_dataset", "class_id", "collate", "colourise", "contact_sheet", "decode", "decode_classes",
    "inspect_source", "make_loader", "open_source", "render_scene", "write_thermalscenes",
]
