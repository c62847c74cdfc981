"""The semantic modes of docs/design.md §5: how each one lays out the Fill canvas and its inputs.

| mode            | canvas                              | semantic tokens         | extra inputs           |
|-----------------|-------------------------------------|-------------------------|------------------------|
| none            | [visible | infrared]                | —                       | —                      |
| pixel_fusion    | [(1−α)·visible + α·semantic | ir]   | —                       | —                      |
| cross_attention | [visible | infrared]                | [semantic | semantic]   | adapter on x_t or x_cond |
| in_context      | [visible | infrared | semantic]     | —                       | —                      |
| channel_concat  | [visible | infrared]                | [semantic | semantic]   | x_embedder widened, zero |

The mask is 1 over the target (infrared) panel. Pure functions on image tensors `[B, 3, H, W]`.
"""

from __future__ import annotations

import torch

from vis2ir.errors import Vis2IRError
from vis2ir.io.inputs import missing_maps_help

MODES = ("none", "pixel_fusion", "cross_attention", "in_context", "channel_concat")
NEEDS_SEMANTIC = ("pixel_fusion", "cross_attention", "in_context", "channel_concat")
SEMANTIC_TOKEN_MODES = ("cross_attention", "channel_concat")
TARGET_PANEL = 1  # the infrared panel, in every layout


def num_panels(mode: str) -> int:
    """Panels across the canvas: 3 for in-context, else 2."""
    return 3 if mode == "in_context" else 2


def build_canvas(mode: str, visible: torch.Tensor, infrared: torch.Tensor | None,
                 semantic: torch.Tensor | None, fusion_alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The Fill canvas and its mask `[B, 1, H, n·W]` (1 = generate here) for `mode`.

    `infrared` may be None at sampling time: the target panel is then blank (it is masked out of
    the condition and only fixes the canvas size).
    """
    if mode not in MODES:
        raise Vis2IRError(f"model.semantic.mode: {mode!r} is not allowed; choose one of {', '.join(MODES)}")
    if mode in NEEDS_SEMANTIC and semantic is None:
        raise Vis2IRError(f"model.semantic.mode={mode} needs a semantic map for every image, and none was given; "
                          + missing_maps_help())
    if infrared is None:
        infrared = torch.zeros_like(visible)
    if mode == "pixel_fusion":
        visible = (1 - fusion_alpha) * visible + fusion_alpha * semantic
    panels = [visible, infrared] + ([semantic] if mode == "in_context" else [])
    canvas = torch.cat(panels, dim=-1)
    b, _, h, w = visible.shape
    mask = torch.zeros(b, 1, h, w * len(panels), dtype=visible.dtype, device=visible.device)
    mask[..., TARGET_PANEL * w:(TARGET_PANEL + 1) * w] = 1
    return canvas, mask


def unknown_maps(visible: torch.Tensor) -> torch.Tensor:
    """All-unknown semantic maps for `visible` `[B, 3, H, W]`: zeros (black, which `palette.decode` reads as
    `VOID`), what `train.semantic_dropout` trains on and what a model trained with it reads when no map is given."""
    return torch.zeros_like(visible)


def drop_maps(semantic: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """`train.semantic_dropout`: each map of `semantic` `[B, 3, H, W]` replaced by the unknown map with
    `probability` (one uniform draw per map from `generator`, on its device: the classifier-free-guidance
    style condition dropout of InstructPix2Pix, Brooks et al. 2023, applied to the semantic map only)."""
    keep = torch.rand(semantic.shape[0], generator=generator, device=generator.device) >= probability
    return semantic * keep.to(semantic.device, semantic.dtype)[:, None, None, None]


def target_tokens(mode: str, rows: int, cols: int, device=None) -> torch.Tensor:
    """Boolean `[rows·cols]`: which packed tokens of the canvas belong to the target panel."""
    n = num_panels(mode)
    per_panel = cols // n
    col = torch.arange(cols, device=device)
    inside = (col >= TARGET_PANEL * per_panel) & (col < (TARGET_PANEL + 1) * per_panel)
    return inside.expand(rows, cols).reshape(-1)


def crop_target(canvas: torch.Tensor, mode: str) -> torch.Tensor:
    """The target panel of a decoded canvas `[B, 3, H, n·W]`."""
    w = canvas.shape[-1] // num_panels(mode)
    return canvas[..., TARGET_PANEL * w:(TARGET_PANEL + 1) * w]


@torch.no_grad()
def widen_x_embedder(transformer: torch.nn.Module, extra: int) -> None:
    """Give the transformer's input projection `extra` new input columns, initialised to zero.

    Freshly widened, the model computes exactly what it did before (the InstructPix2Pix /
    ControlNet zero-init idea), so training starts from the unchanged pretrained model.
    """
    old = transformer.x_embedder
    new = torch.nn.Linear(old.in_features + extra, old.out_features, bias=old.bias is not None,
                          device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, :old.in_features] = old.weight
    if old.bias is not None:
        new.bias.copy_(old.bias)
    transformer.x_embedder = new
    transformer.register_to_config(in_channels=old.in_features + extra)
