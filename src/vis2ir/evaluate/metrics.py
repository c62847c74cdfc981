"""Image metrics under the field's conventions (DESIGN §8).

Infrared is compared as one channel (the mean of the three replicated ones). The ThermalGen
protocol resizes both images to 256×256 (bilinear) before PSNR and SSIM with data_range 1, so that
figures sit in the field's tables; `native` scores at the images' own resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


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


def psnr_ssim(pred: torch.Tensor, target: torch.Tensor, protocol: str = "thermalgen") -> dict[str, float]:
    """Mean PSNR (dB) and SSIM over a batch, each image scored on its own."""
    p, t = prepare(pred, protocol), prepare(target, protocol)
    psnr = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none")
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
