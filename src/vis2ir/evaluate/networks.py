"""The two downloaded-weight metrics, without torchvision (docs/design.md §6): FID and LPIPS-alex.

- FID: pytorch-fid's Inception-v3 (the TensorFlow FID graph ported to PyTorch), built here layer for
  layer with the same module names, so its weights file `pt_inception-2015-12-05-6726825d.pth` loads
  strictly; 2048-d pool features → the Fréchet distance between two Gaussians.
- LPIPS-alex (v0.1): torchvision's AlexNet `features` (weights file `alexnet-owt-7be5be79.pth`) and
  the linear layers that torchmetrics ships (`lpips_models/alex.pth`), combined as torchmetrics does.

Weights are looked up in: the setting (`eval.fid_weights` / `eval.lpips_weights`, a file or a folder),
the environment (`VIS2IR_FID_WEIGHTS` / `VIS2IR_LPIPS_WEIGHTS`), then the torch hub cache
(`$TORCH_HOME/hub/checkpoints`, where pytorch-fid and torchvision download them). When absent,
`MissingWeights` names the file and every place looked at.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vis2ir.errors import Vis2IRError

FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
FID_ENV = "VIS2IR_FID_WEIGHTS"
LPIPS_ENV = "VIS2IR_LPIPS_WEIGHTS"


class MissingWeights(Vis2IRError):
    """A metric's weights file is not on this machine."""


# ----------------------------------------------------------------------------------------------
# Finding weights


def hub_checkpoints() -> Path:
    """torch's download cache for weights files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(filename: str, setting: str | None, setting_name: str, env: str) -> Path:
    """The weights file `filename` from the setting, the environment variable, or the torch hub cache."""
    places = [(setting_name, setting), (f"${env}", os.environ.get(env)), ("torch cache", str(hub_checkpoints()))]
    looked = []
    for label, value in places:
        if not value:
            continue
        path = Path(value).expanduser()
        path = path / filename if path.is_dir() or label == "torch cache" else path
        if path.is_file():
            return path
        looked.append(f"{label} {path}")
    raise MissingWeights(f"{filename} not found (looked at: {'; '.join(looked)}); download it and set "
                         f"{setting_name}=PATH or ${env}")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise Vis2IRError(f"{path}: cannot read the weights ({type(err).__name__}: {err})") from None


def _load_strict(module: nn.Module, state: dict, path: Path) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ
        raise Vis2IRError(f"{path}: not the expected weights ({str(err).strip().splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise Vis2IRError(f"{path}: not the expected weights ({len(missing)} missing keys, e.g. "
                          f"{(missing or ['-'])[0]}; {len(unexpected)} unexpected, e.g. {(unexpected or ['-'])[0]})")


# ----------------------------------------------------------------------------------------------
# Fréchet distance


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + tr(Σ1) + tr(Σ2) − 2·tr((Σ1·Σ2)^½).

    tr((Σ1·Σ2)^½) is the sum of the square roots of the eigenvalues of Σ1·Σ2 (real and ≥ 0 for two
    covariance matrices, up to rounding), as torchmetrics computes it; no matrix square root needed.
    """
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    eigenvalues = np.linalg.eigvals(np.asarray(sigma1, np.float64) @ np.asarray(sigma2, np.float64))
    trace_sqrt = np.sqrt(eigenvalues.astype(np.complex128)).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


# ----------------------------------------------------------------------------------------------
# Inception-v3 for FID (module names as torchvision's, so the weights load strictly)


class Conv(nn.Module):
    """Conv (no bias) → BatchNorm (eps 0.001) → ReLU, named as torchvision's BasicConv2d."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3×3 average pool: padded zeros are not counted."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, **row)
        self.branch7x7_3 = Conv(c7, 192, **col)
        self.branch7x7dbl_1, self.branch7x7dbl_2 = Conv(cin, c7, 1), Conv(c7, c7, **col)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = Conv(c7, c7, **row), Conv(c7, c7, **col)
        self.branch7x7dbl_5 = Conv(c7, 192, **row)
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """`max_pool`: the FID graph's last block pools by maximum (pytorch-fid's FIDInceptionE_2)."""

    def __init__(self, cin: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Images `[B, 3, H, W]` in [0, 1] → 2048-d pool features (pytorch-fid's default block)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, stride=2), Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(64, 80, 1), Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = InceptionD(768), InceptionE(1280), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; not used for features

    @classmethod
    def load(cls, path: Path) -> FIDInception:
        net = cls()
        _load_strict(net, _load_state(path), path)
        return net.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = x * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------
# LPIPS-alex


LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
ALEX_CHANNELS = (64, 192, 384, 256, 256)
# torchvision AlexNet `features` indices of the five conv layers (each followed by a ReLU).
ALEX_CONVS = (0, 3, 6, 8, 10)


def lpips_linear_file() -> Path:
    """The LPIPS v0.1 linear-layer weights that torchmetrics ships."""
    import torchmetrics.functional.image as tm_image

    return Path(tm_image.__file__).parent / "lpips_models" / "alex.pth"


def normalise_features(f: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Unit length along channels (torchmetrics' `_normalize_tensor`)."""
    return f / torch.sqrt(eps + f.square().sum(dim=1, keepdim=True))


def lpips_from_features(feats0: list[torch.Tensor], feats1: list[torch.Tensor],
                        weights: list[torch.Tensor]) -> torch.Tensor:
    """Σ_layers mean_hw( w · (n(f0) − n(f1))² ) per image, `w` the layer's `[C]` linear weights."""
    total = 0
    for f0, f1, w in zip(feats0, feats1, weights):
        diff = (normalise_features(f0) - normalise_features(f1)).square()
        total = total + (diff * w.view(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))
    return total


class AlexLPIPS(nn.Module):
    """LPIPS v0.1 with AlexNet: images `[B, 3, H, W]` in [0, 1] → distance per image."""

    def __init__(self):
        super().__init__()
        convs = [(3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1)]
        self.features = nn.ModuleDict({str(i): nn.Conv2d(cin, cout, k, s, p)
                                       for i, (cin, cout, k, s, p) in zip(ALEX_CONVS, convs)})
        self.lins = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in ALEX_CHANNELS])
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, alexnet: Path, linear: Path | None = None) -> AlexLPIPS:
        net = cls()
        state = _load_state(alexnet)
        conv = {f"{i}.{p}": state.get(f"features.{i}.{p}") for i in ALEX_CONVS for p in ("weight", "bias")}
        if any(v is None for v in conv.values()):
            raise Vis2IRError(f"{alexnet}: not torchvision AlexNet weights (no features.N.weight keys)")
        _load_strict(net.features, conv, alexnet)
        linear = linear or lpips_linear_file()
        if not linear.is_file():
            raise MissingWeights(f"{linear}: the LPIPS linear-layer weights (shipped with torchmetrics) are missing; "
                                 "reinstall torchmetrics")
        lin = _load_state(linear)
        for k, p in enumerate(net.lins):
            p.data.copy_(lin[f"lin{k}.model.1.weight"].flatten())
        return net.eval().requires_grad_(False)

    def features_of(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs LPIPS compares (relu1 … relu5)."""
        x = ((images.float() * 2 - 1) - self.shift) / self.scale
        out = []
        for k, i in enumerate(ALEX_CONVS):
            if k in (1, 2):
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(self.features[str(i)](x))
            out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return lpips_from_features(self.features_of(a), self.features_of(b), list(self.lins))
