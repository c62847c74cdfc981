"""The maths of the metrics, offline: Fréchet distance, LPIPS, SSIM precision, per-class heat errors, weight lookup."""

import numpy as np
import pytest
import torch
from scipy import linalg
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.functional.image.lpips import ScalingLayer, _normalize_tensor, _spatial_average

from vis2ir.config import EvalConfig
from vis2ir.palette import CLASS_NAMES, class_id
from vis2ir.evaluate import metrics
from vis2ir.evaluate.metrics import (ClassAccumulator, class_sums, hot_threshold, prepare, psnr_ssim,
                                     score_dtype)
from vis2ir.evaluate.networks import (ALEXNET_FILE, FID_FILE, AlexLPIPS, FIDInception, MissingWeights,
                                      feature_stats, find_weights, frechet_distance, lpips_from_features)
from vis2ir.evaluate.scoring import Scorer


def test_frechet_distance_matches_a_scipy_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    b = rng.normal(size=(150, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(*feature_stats(a), *feature_stats(b)) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(*feature_stats(a), *feature_stats(a)) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_diagonal_gaussians_has_a_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # 5 + 1 + 1 + 4
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected) == 11.0


def test_lpips_distance_from_features_by_hand():
    f0 = [torch.tensor([[[[3.0]], [[4.0]]]])]    # one layer, 2 channels, 1×1: unit vector (0.6, 0.8)
    f1 = [torch.tensor([[[[0.0]], [[2.0]]]])]    # unit vector (0, 1)
    w = [torch.tensor([1.0, 2.0])]
    # w · (n0 − n1)² = 1·0.36 + 2·0.04 = 0.44
    assert lpips_from_features(f0, f1, w).item() == pytest.approx(0.44, rel=1e-6)


def test_alex_lpips_equals_torchmetrics_composition():
    """Our network with random weights against torchmetrics' own LPIPS pieces, layer by layer."""
    torch.manual_seed(0)
    net = AlexLPIPS()
    for p in net.lins:
        p.data.uniform_(0, 1)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    scaled = [ScalingLayer()(x * 2 - 1) for x in (a, b)]
    convs = [net.features[str(i)] for i in (0, 3, 6, 8, 10)]
    pools = {1, 2}

    def feats(x):
        out = []
        for k, conv in enumerate(convs):
            x = torch.relu(conv(torch.nn.functional.max_pool2d(x, 3, 2) if k in pools else x))
            out.append(x)
        return out

    expected = sum(_spatial_average(((_normalize_tensor(x) - _normalize_tensor(y)) ** 2 * w.view(1, -1, 1, 1))
                                    .sum(1, keepdim=True)).flatten()
                   for x, y, w in zip(feats(scaled[0]), feats(scaled[1]), net.lins))
    torch.testing.assert_close(net(a, b), expected)
    assert net(a, a).abs().max() < 1e-6


def test_fid_inception_has_the_pytorch_fid_shape():
    net = FIDInception()
    # torchvision's inception_v3 without the auxiliary head, 1008 classes: the FID weights file's size.
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    assert {k for k in net.state_dict() if k.startswith("Mixed_7c.branch_pool")} >= {"Mixed_7c.branch_pool.conv.weight"}


def hand_images():
    """4×4: left half person (truth 0.8), right half car (truth 0.2); the prediction cools the person
    to 0.6 and makes one car pixel hot (0.9)."""
    classes = torch.full((4, 4), class_id("car"))
    classes[:, :2] = class_id("person")
    truth = torch.where(classes == class_id("person"), 0.8, 0.2)
    pred = torch.where(classes == class_id("person"), 0.6, 0.2)
    pred[0, 3] = 0.9
    return pred, truth, classes


def test_scores_are_float64_on_cuda_and_float32_elsewhere(monkeypatch):
    """cuDNN's default TF32 convolutions lowered SSIM by 0.04 on an H100 (docs/results.md), so CUDA
    scores in float64; on a CPU float32 agrees with float64 to 1e-5. `psnr_ssim` follows `score_dtype`."""
    assert score_dtype(torch.device("cuda", 0)) == torch.float64
    assert score_dtype(torch.device("cpu")) == score_dtype(torch.device("mps")) == torch.float32
    g = torch.Generator().manual_seed(0)
    truth = torch.nn.functional.avg_pool2d(torch.rand(4, 1, 64, 64, generator=g), 5, 1, 2)
    pred = (truth + 0.05 * torch.randn(truth.shape, generator=g)).clamp(0, 1)
    p, t = prepare(pred, "thermalgen").double(), prepare(truth, "thermalgen").double()
    double = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none").mean().item()
    single = psnr_ssim(pred, truth)["ssim"]
    assert abs(single - double) < 1e-5 and 0.3 < single < 0.99  # a real, non-trivial score
    assert single != double  # float32 here, so the next line tests that psnr_ssim uses score_dtype
    monkeypatch.setattr(metrics, "score_dtype", lambda device: torch.float64)
    assert psnr_ssim(pred, truth)["ssim"] == double


def test_per_class_metrics_on_hand_made_images():
    pred, truth, classes = hand_images()
    assert hot_threshold(truth, 90.0).item() == pytest.approx(0.8)  # nothing in the truth is above it
    acc = ClassAccumulator(CLASS_NAMES, 90.0)
    acc.add(pred, truth, classes)
    out = acc.summary()
    assert set(out) == {"person", "car"}
    assert out["person"]["abs_err"] == pytest.approx(0.2) and out["person"]["mean_err"] == pytest.approx(0.2)
    assert out["person"]["hallucinated_heat"] == 0.0
    assert out["car"]["abs_err"] == pytest.approx(0.7 / 8) and out["car"]["mean_err"] == pytest.approx(0.7 / 8)
    assert out["car"]["hallucinated_heat"] == pytest.approx(1 / 8) and out["car"]["pixels"] == 8


def test_per_class_mean_error_averages_images_and_void_is_its_own_row():
    pred, truth, classes = hand_images()
    acc = ClassAccumulator(CLASS_NAMES, 50.0)
    acc.add(pred, truth, classes)
    classes2 = classes.clone()
    classes2[3, 3] = -1  # VOID
    acc.add(truth, truth, classes2)  # a perfect second image
    out = acc.summary()
    assert out["person"]["images"] == 2 and out["person"]["mean_err"] == pytest.approx(0.1)
    assert out["void"]["pixels"] == 1 and out["car"]["pixels"] == 15
    sums = class_sums(pred, truth, classes, len(CLASS_NAMES))
    assert sums[:, 0].sum() == 16


def test_missing_weights_name_the_file_and_the_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("VIS2IR_FID_WEIGHTS", raising=False)
    with pytest.raises(MissingWeights, match=rf"{FID_FILE} not found .*eval.fid_weights=PATH or \$VIS2IR_FID_WEIGHTS"):
        find_weights(FID_FILE, None, "eval.fid_weights", "VIS2IR_FID_WEIGHTS")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / FID_FILE).write_bytes(b"x")
    monkeypatch.setenv("VIS2IR_FID_WEIGHTS", str(tmp_path / "w"))
    assert find_weights(FID_FILE, None, "eval.fid_weights", "VIS2IR_FID_WEIGHTS") == tmp_path / "w" / FID_FILE


def test_scorer_skips_only_the_metrics_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for env in ("VIS2IR_FID_WEIGHTS", "VIS2IR_LPIPS_WEIGHTS"):
        monkeypatch.delenv(env, raising=False)
    scorer = Scorer(EvalConfig())
    pred, truth, classes = (x.repeat_interleave(4, 0).repeat_interleave(4, 1) for x in hand_images())  # 16×16
    for i in range(2):
        scorer.add(f"x{i}", pred[None].expand(3, -1, -1), truth[None].expand(3, -1, -1), classes)
    result = scorer.result()
    assert result["metrics"]["fid"] is None and result["metrics"]["lpips"] is None
    assert FID_FILE in result["skipped"]["fid"] and ALEXNET_FILE in result["skipped"]["lpips"]
    mse = ((pred - truth) ** 2).mean()
    assert result["metrics"]["psnr_native"] == pytest.approx(float(-10 * torch.log10(mse)), rel=1e-5)
    assert result["classes"]["car"]["hallucinated_heat"] == pytest.approx(1 / 8)


def test_fid_with_noise_draws_is_the_mean_of_each_draws_fid():
    """Several draws of the same images: FID is each draw's FID against the truths (taken once),
    averaged, not one FID of the pooled draws; one image in two draws is still too few for FID."""
    features = lambda x: torch.nn.functional.adaptive_avg_pool2d(x[:, :1], 2).flatten(1)  # noqa: E731 - 4-d
    nets = ({"fid": features}, {})
    g = torch.Generator().manual_seed(1)
    truths = [torch.rand(3, 16, 16, generator=g) for _ in range(8)]
    draws = [[(t + 0.2 * torch.rand(3, 16, 16, generator=g)).clamp(0, 1) for t in truths] for _ in range(2)]
    both = Scorer(EvalConfig(batch_size=2), "cpu", nets)
    for d, preds in enumerate(draws):
        for i, (p, t) in enumerate(zip(preds, truths)):
            both.add(f"x{i}", p, t, draw=d)
    alone = []
    for preds in draws:
        scorer = Scorer(EvalConfig(batch_size=2), "cpu", nets)
        for i, (p, t) in enumerate(zip(preds, truths)):
            scorer.add(f"x{i}", p, t)
        alone.append(scorer.result()["metrics"]["fid"])
    result = both.result()
    assert result["images"] == 8 and result["draws"] == 2 and alone[0] != pytest.approx(alone[1], rel=1e-3)
    assert [d["fid"] for d in result["per_draw"]] == pytest.approx(alone, rel=1e-6)
    assert result["metrics"]["fid"] == pytest.approx(np.mean(alone), rel=1e-6)
    one = Scorer(EvalConfig(), "cpu", nets)
    for d in range(2):
        one.add("x0", draws[d][0], truths[0], draw=d)
    assert one.result()["metrics"]["fid"] is None and one.skipped["fid"] == "needs at least 2 images"


def test_bad_weights_file_is_a_one_line_error(tmp_path):
    path = tmp_path / FID_FILE
    torch.save({"fc.weight": torch.zeros(3)}, path)
    with pytest.raises(Exception, match=r"not the expected weights \("):
        FIDInception.load(path)
