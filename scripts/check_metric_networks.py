"""Check the metric networks of `vis2ir.evaluate.networks` against the reference implementations.

Our FID Inception and LPIPS-AlexNet are rebuilt without torchvision (it does not import beside the
CPU torch wheel), so this script loads the same random weights into ours and into the references —
pytorch-fid's `InceptionV3` and the `lpips` package's `LPIPS(net="alex")` — and prints the largest
differences of features and distances on random images. It needs torchvision, pytorch-fid and
lpips (a CUDA install of torch; nothing is downloaded: the random weights are written where the
references look for their downloads). It also prints the golden values of
`tests/evaluate/test_metrics.py::test_networks_golden_features` as the references compute them.

    python scripts/check_metric_networks.py [--device cuda] [--json out.json]

Differences are relative: max |ours − reference| / max |reference|. TF32 is switched off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from vis2ir.evaluate.networks import ALEX_CONVS, ALEXNET_FILE, FID_FILE, AlexLPIPS, FIDInception, frechet_distance


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Variance-keeping random weights, and random batch-norm statistics (so every layer matters)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5
            if m.bias is not None:
                m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
        elif isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = 0.5 + torch.rand(n, generator=g)


def golden_input(seed: int = 0, size: int = 64) -> torch.Tensor:
    """The fixed input of the CPU golden test: two smooth random images `[2, 3, size, size]` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(2, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def images(n: int, size: int, seed: int, device) -> torch.Tensor:
    """Random images with structure at several scales, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, 3, size, size)
    for cells in (4, 16, size):
        out += torch.nn.functional.interpolate(torch.rand(n, 3, cells, cells, generator=g), size=(size, size),
                                               mode="bilinear", align_corners=False)
    return (out / 3).to(device)


def check_fid(cache: Path, device: torch.device, distance: bool = True) -> dict:
    import pytorch_fid.fid_score as fid_score
    import scipy.linalg
    from pytorch_fid.inception import InceptionV3

    # pytorch-fid 0.3 calls `sqrtm(..., disp=False)`, which newer SciPy dropped: same maths, new signature.
    fid_score.linalg = type("linalg", (), {"sqrtm": staticmethod(lambda a, disp=True: (scipy.linalg.sqrtm(a), 0))})

    ours = FIDInception()
    randomise(ours, 1)
    torch.save(ours.state_dict(), cache / FID_FILE)  # where pytorch-fid finds its download
    ours = FIDInception.load(cache / FID_FILE).to(device)
    ref = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(device)
    out = {}
    with torch.no_grad():
        for size in (299, 256):
            x = images(8, size, size, device)
            a, b = ours(x), ref(x)[0].flatten(1)
            out[f"features_{size}px_rel"] = rel(a, b)
            out[f"features_{size}px_abs"] = float((a - b).abs().max())
        sets = {"ours": [], "ref": []}
        for k in range(2 if distance else 0):  # two sets of 2304 images: a non-singular 2048-d covariance
            feats = {"ours": [], "ref": []}
            for i in range(9):
                x = images(256, 96, 100 * k + i, device) ** (1 + k)
                feats["ours"].append(ours(x).cpu())
                feats["ref"].append(ref(x)[0].flatten(1).cpu())
            for name in sets:
                sets[name].append(torch.cat(feats[name]).double().numpy())
        if distance:
            stats = {name: [(f.mean(0), np.cov(f, rowvar=False)) for f in fs] for name, fs in sets.items()}
            ours_fid = frechet_distance(*stats["ours"][0], *stats["ours"][1])
            ref_fid = fid_score.calculate_frechet_distance(*stats["ref"][0], *stats["ref"][1])
            out |= {"fid_ours": ours_fid, "fid_reference": float(ref_fid),
                    "fid_rel": abs(ours_fid - ref_fid) / abs(ref_fid)}
        ref_cpu = InceptionV3([3]).eval()
        golden = ref_cpu(golden_input())[0].flatten(1)
        out["golden_fid_features"] = {"first": golden[:, :6].tolist(), "mean": golden.mean(1).tolist(),
                                      "std": golden.std(1).tolist()}
    return out


def check_lpips(cache: Path, device: torch.device) -> dict:
    import lpips
    import torchvision

    alex = torchvision.models.alexnet()
    randomise(alex, 2)
    torch.save(alex.state_dict(), cache / ALEXNET_FILE)
    linear = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    ours = AlexLPIPS.load(cache / ALEXNET_FILE, linear).to(device)
    ref = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)
    layers = {name: module for s in ref.net.children() for name, module in s.named_children()}
    for i in ALEX_CONVS:  # the same random AlexNet in the reference
        layers[str(i)].load_state_dict(alex.features[i].state_dict())
    ref = ref.eval().to(device)
    out = {}
    with torch.no_grad():
        for size in (64, 256):
            a, b = images(8, size, 7 + size, device), images(8, size, 9 + size, device)
            mine, theirs = ours.features_of(a), ref.net(ref.scaling_layer(2 * a - 1))
            out[f"features_{size}px_rel"] = max(rel(x, y) for x, y in zip(mine, theirs))
            d_ours, d_ref = ours(a, b), ref(a, b, normalize=True).flatten()
            out[f"distance_{size}px_rel"] = rel(d_ours, d_ref)
            out[f"distance_{size}px_abs"] = float((d_ours - d_ref).abs().max())
        x = golden_input()
        ref_cpu = ref.cpu()
        out["golden_lpips_distance"] = ref_cpu(x[:1], x[1:], normalize=True).flatten().tolist()
    from vis2ir.evaluate.networks import lpips_linear_file
    out["torchmetrics_linear_file_equals_lpips"] = lpips_linear_file().read_bytes() == linear.read_bytes()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--no-distance", action="store_true", help="skip the FID of 2 × 2304 images (slow on a CPU)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as home:
        os.environ["TORCH_HOME"] = home
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        cache.mkdir(parents=True)
        import torchvision

        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "torchvision": torchvision.__version__,
                  "lpips": check_lpips(cache, device)}
        result["fid"] = check_fid(cache, device, not args.no_distance)
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
