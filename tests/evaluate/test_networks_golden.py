"""Golden outputs of the metric networks, as the reference implementations computed them.

`scripts/check_metric_networks.py` loaded the same seeded random weights into pytorch-fid's
`InceptionV3` and the `lpips` package's `LPIPS(net="alex")` on a machine with torchvision (an H200,
torch 2.11; docs/evaluation.md) and printed these values; ours must reproduce them on the CPU, so a
changed layer, order, pooling or normalisation is caught without torchvision.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from vis2ir.evaluate.networks import AlexLPIPS, FIDInception, lpips_linear_file

SCRIPT = Path(__file__).parents[2] / "scripts" / "check_metric_networks.py"

# pytorch-fid InceptionV3 (2048-d pool features) of `golden_input()`, weights `randomise(net, 1)`.
FID_FIRST = [[0.7425010800361633, 0.19442372024059296, 0.01091731432825327, 0.05434109643101692,
              4.6005635261535645, 2.451491355895996],
             [0.5265355110168457, 0.2956223487854004, 0.03331751376390457, 0.09993812441825867,
              4.035461902618408, 2.1561102867126465]]
FID_MEAN = [1.706010341644287, 1.518497109413147]
FID_STD = [2.3963887691497803, 2.1371498107910156]
# lpips.LPIPS(net="alex", version="0.1") between the two golden images, AlexNet `randomise(net, 2)`.
LPIPS_DISTANCE = 0.11110976338386536


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_metric_networks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fid_inception_reproduces_pytorch_fid(check):
    net = FIDInception()
    check.randomise(net, 1)
    with torch.no_grad():
        features = net.eval()(check.golden_input())
    assert features.shape == (2, 2048)
    torch.testing.assert_close(features[:, :6], torch.tensor(FID_FIRST), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features.mean(1), torch.tensor(FID_MEAN), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features.std(1), torch.tensor(FID_STD), rtol=1e-4, atol=1e-5)


def test_alex_lpips_reproduces_the_lpips_package(check, tmp_path):
    net = AlexLPIPS()
    check.randomise(net, 2)  # the same draws as torchvision's AlexNet: conv layers in the same order
    state = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    torch.save(state, tmp_path / "alexnet.pth")
    net = AlexLPIPS.load(tmp_path / "alexnet.pth", lpips_linear_file())  # the package's own loading path
    x = check.golden_input()
    with torch.no_grad():
        distance = net(x[:1], x[1:])
    assert distance.item() == pytest.approx(LPIPS_DISTANCE, rel=1e-4)
