"""Image metrics under the field's conventions (docs/design.md §8).

Infrared is compared as one channel (the mean of the three replicated ones). The ThermalGen
protocol resizes both images to 256×256 (bilinear) before PSNR and SSIM with data_range 1, so that
figures sit in the field's tables; `native` scores at the images' own resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

# Classes that look alike in the visible image but differ in heat (docs/design.md §7): their errors show
# whether a model uses the semantic map.
LOOKALIKE_CLASSES = ("person", "statue", "car", "car-running")


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """`[B, 3, H, W]` or `[B, 1, H, W]` in [0, 1] → `[B, 1, H, W]` float."""
    images = images.float()
    return images.mean(dim=1, keepdim=True) if images.shape[1] != 1 else images


def prepare(images: torch.Tensor, protocol: str) -> torch.Tensor:
    grey = to_grey(images)
    if protocol == "thermalgen":
        grey = F.interpolate(grey, size=(256, 256), mode="bilinear", align_corners=False)
    elif protocol != "native":
        raise ValueError(f"protocol {protocol!r}: expected 'thermalgen' or 'native'")
    return grey.clamp(0, 1)


def score_dtype(device: torch.device) -> torch.dtype:
    """The precision PSNR and SSIM are computed in: float64 on CUDA, float32 elsewhere.

    SSIM's variances are differences of nearly equal means, and cuDNN runs float32 convolutions in
    TF32 (10-bit mantissa) by default: that lowered SSIM by 0.013–0.04 on an H100 against the same
    images scored on a CPU (docs/results.md). A CPU's float32 is within 1e-5 of float64 and 15×
    faster there; Apple's MPS has no float64."""
    return torch.float64 if device.type == "cuda" else torch.float32


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor, protocol: str = "thermalgen") -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over a batch, each image scored on its own (in `score_dtype`)."""
    dtype = score_dtype(pred.device)
    p, t = prepare(pred, protocol).to(dtype), prepare(target, protocol).to(dtype)
    psnr = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none")
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}


# ----------------------------------------------------------------------------------------------
# Per-class heat metrics (on the semantic map's classes, at the truth's resolution)

# Columns of `class_sums`: pixels, Σ|pred − truth|, Σpred, Σtruth, hallucinated hot pixels,
# pixels not hot in the truth.
_PIXELS, _ABS, _PRED, _TRUTH, _HALLUC, _COLD = range(6)


def hot_threshold(truth: torch.Tensor, percentile: float) -> torch.Tensor:
    """The intensity above which a pixel counts as hot: the truth image's `percentile`-th percentile."""
    return torch.quantile(truth.float().flatten(), percentile / 100.0)


def class_sums(pred: torch.Tensor, truth: torch.Tensor, classes: torch.Tensor, num_classes: int,
               percentile: float = 90.0) -> torch.Tensor:
    """Per-class sums of one image, float64 `[num_classes + 1, 6]` (row 0: VOID, row c + 1: class c).

    `pred`, `truth`: grey `[H, W]` in [0, 1]; `classes`: palette ids `[H, W]` (VOID = -1). A pixel is
    hot when it is brighter than `hot_threshold(truth, percentile)`; it is hallucinated heat when it
    is hot in the prediction but not in the truth.
    """
    pred, truth = pred.double().flatten(), truth.double().flatten()
    keys = classes.long().flatten() + 1
    tau = hot_threshold(truth, percentile)
    cold = truth <= tau
    columns = (torch.ones_like(pred), (pred - truth).abs(), pred, truth, ((pred > tau) & cold).double(),
               cold.double())
    n = num_classes + 1
    return torch.stack([torch.bincount(keys, weights=c, minlength=n)[:n] for c in columns], dim=1)


class ClassAccumulator:
    """Per-class errors over many images: mean absolute error, mean-intensity error, hallucinated heat."""

    def __init__(self, names: tuple[str, ...], percentile: float = 90.0):
        self.names, self.percentile = names, percentile
        self.totals = torch.zeros(len(names) + 1, 6, dtype=torch.float64)
        self.mean_err = torch.zeros(len(names) + 1, dtype=torch.float64)  # Σ over images of |mean_p − mean_t|
        self.images = torch.zeros(len(names) + 1, dtype=torch.float64)    # images in which the class appears

    def add(self, pred: torch.Tensor, truth: torch.Tensor, classes: torch.Tensor) -> None:
        """One image: grey `[H, W]` prediction and truth, class ids `[H, W]`."""
        sums = class_sums(pred, truth, classes, len(self.names), self.percentile)
        self.totals += sums
        present = sums[:, _PIXELS] > 0
        pixels = sums[:, _PIXELS].clamp(min=1)
        self.mean_err += torch.where(present, ((sums[:, _PRED] - sums[:, _TRUTH]) / pixels).abs(), 0.0)
        self.images += present.double()

    def summary(self) -> dict[str, dict[str, float]]:
        """`{class name: {pixels, images, abs_err, mean_err, hallucinated_heat}}` for the classes seen."""
        out = {}
        for row in torch.nonzero(self.totals[:, _PIXELS] > 0).flatten().tolist():
            t = self.totals[row]
            name = "void" if row == 0 else self.names[row - 1]
            out[name] = {"pixels": int(t[_PIXELS]), "images": int(self.images[row]),
                         "abs_err": float(t[_ABS] / t[_PIXELS]),
                         "mean_err": float(self.mean_err[row] / self.images[row]),
                         "hallucinated_heat": float(t[_HALLUC] / t[_COLD]) if t[_COLD] > 0 else 0.0}
        return out
