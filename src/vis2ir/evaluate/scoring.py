"""`Scorer`: every metric of `vis2ir evaluate`, accumulated one (prediction, truth) pair at a time.

Per image: PSNR and SSIM under the ThermalGen protocol and at native resolution (`metrics.psnr_ssim`),
LPIPS-alex on the 256×256 grey images. Over the set: FID between the Inception features of the
predictions and of the truths (with several noise draws: the mean of each draw's FID). Per class of
the semantic map: `metrics.ClassAccumulator`.
A metric whose weights are missing is skipped with a one-line reason; the others still run.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from vis2ir.config import EvalConfig
from vis2ir.palette import CLASS_NAMES
from vis2ir.errors import Vis2IRError
from vis2ir.io.runtime import default_device
from vis2ir.evaluate.metrics import ClassAccumulator, prepare, psnr_ssim, to_grey
from vis2ir.evaluate.networks import (ALEXNET_FILE, FID_ENV, FID_FILE, LPIPS_ENV, AlexLPIPS, FIDInception,
                                      MissingWeights, feature_stats, find_weights, frechet_distance)

log = logging.getLogger(__name__)
_warned: set[str] = set()  # each missing-weights message is logged once per process


def load_networks(cfg: EvalConfig, device) -> tuple[dict, dict[str, str]]:
    """The FID and LPIPS networks whose weights are here, and why the others are skipped."""
    nets, skipped = {}, {}
    wanted = (("fid", FIDInception.load, FID_FILE, cfg.fid_weights, "eval.fid_weights", FID_ENV),
              ("lpips", AlexLPIPS.load, ALEXNET_FILE, cfg.lpips_weights, "eval.lpips_weights", LPIPS_ENV))
    for name, load, filename, setting, setting_name, env in wanted:
        try:
            nets[name] = load(find_weights(filename, setting, setting_name, env)).to(device)
        except MissingWeights as err:
            skipped[name] = str(err)
            if str(err) not in _warned:
                _warned.add(str(err))
                log.warning("%s skipped: %s", name.upper(), err)
    return nets, skipped


class Scorer:
    """Add pairs with `add`, then read `result()`."""

    def __init__(self, cfg: EvalConfig, device: str | torch.device = "cpu", networks: tuple | None = None,
                 examples: int = 0):
        """`networks`: what `load_networks(cfg, device)` returned, to share between several scorers;
        `examples`: how many of the first pairs (of draw 0) to keep in `self.examples` as scored — name,
        prediction and truth, grey float `[H, W]` at the truth's size — for a picture."""
        self.cfg, self.device = cfg, default_device(device)
        self.nets, self.skipped = networks or load_networks(cfg, self.device)
        self.classes = ClassAccumulator(CLASS_NAMES, cfg.hot_percentile)
        self.rows: list[dict] = []
        self.features: dict[str, list[np.ndarray]] = {"pred": [], "truth": [], "draw": []}
        self.pending: dict[str, list[torch.Tensor]] = {"pred": [], "truth": []}
        self.pending_draws: list[int] = []
        self.with_classes = 0
        self.keep_examples = examples
        self.examples: list[tuple[str, np.ndarray, np.ndarray]] = []

    @torch.no_grad()
    def add(self, name: str, pred: torch.Tensor, truth: torch.Tensor, classes: torch.Tensor | None = None,
            draw: int = 0) -> dict:
        """One image: `pred`, `truth` `[3|1, H, W]` in [0, 1] (the prediction is resized to the truth's
        size if it differs), `classes` palette ids `[H, W]` at the truth's size, or None. `draw`: which
        noise draw of the same image this is (`eval.noise_draws`); every draw counts alike, and FID
        takes the truths' features from draw 0."""
        # On the scorer's device: SSIM at 256×256 is the costly part, and CPU threads are scarce when
        # several evaluations share a machine (`scripts/ablate_gpus.sh`).
        pred, truth = to_grey(pred[None].to(self.device)), to_grey(truth[None].to(self.device))
        if pred.shape[-2:] != truth.shape[-2:]:
            pred = F.interpolate(pred, size=truth.shape[-2:], mode="bilinear", align_corners=False)
        if draw == 0 and len(self.examples) < self.keep_examples:
            self.examples.append((name, pred[0, 0].cpu().numpy(), truth[0, 0].cpu().numpy()))
        row = {"name": name, "draw": draw, **psnr_ssim(pred, truth, "thermalgen")}
        row.update({f"{k}_native": v for k, v in psnr_ssim(pred, truth, "native").items()})
        if "lpips" in self.nets:
            a, b = (prepare(x, "thermalgen").expand(-1, 3, -1, -1) for x in (pred, truth))
            row["lpips"] = float(self.nets["lpips"](a, b)[0])
        if "fid" in self.nets:
            for key, x in (("pred", pred), ("truth", truth)) if draw == 0 else (("pred", pred),):
                self.pending[key].append(F.interpolate(x.clamp(0, 1), size=(299, 299), mode="bilinear",
                                                       align_corners=False).expand(-1, 3, -1, -1))
            self.pending_draws.append(draw)
            if len(self.pending["pred"]) >= self.cfg.batch_size:
                self._flush_features()
        if classes is not None:
            if tuple(classes.shape[-2:]) != tuple(truth.shape[-2:]):
                raise Vis2IRError(f"{name}: semantic map is {list(classes.shape[-2:])}, the truth "
                                  f"{list(truth.shape[-2:])}; they must be the same size")
            self.classes.add(pred[0, 0].cpu(), truth[0, 0].cpu(), classes)
            self.with_classes += 1
        self.rows.append(row)
        return row

    @torch.no_grad()
    def _flush_features(self) -> None:
        """Inception features of the images waiting in `pending`."""
        for key, images in self.pending.items():
            if images:
                self.features[key].append(self.nets["fid"](torch.cat(images).to(self.device)).cpu().numpy())
                images.clear()
        if self.pending_draws:
            self.features["draw"].append(np.array(self.pending_draws))
            self.pending_draws.clear()

    def fid(self) -> dict[int, float] | None:
        """FID of each noise draw's predictions against the truths (None when skipped or with fewer
        than 2 images)."""
        if "fid" not in self.nets:
            return None
        self._flush_features()
        if len({r["name"] for r in self.rows}) < 2:
            self.skipped["fid"] = "needs at least 2 images"
            return None
        pred, draws = np.concatenate(self.features["pred"]), np.concatenate(self.features["draw"])
        truth = feature_stats(np.concatenate(self.features["truth"]))
        return {int(d): frechet_distance(*feature_stats(pred[draws == d]), *truth) for d in np.unique(draws)}

    def result(self) -> dict:
        """Summary (means over images, FID over the set), per class, per image, settings."""
        if not self.rows:
            raise Vis2IRError("no images were scored")
        keys = [k for k in self.rows[0] if k not in ("name", "draw")]
        summary = {k: float(np.mean([r[k] for r in self.rows])) for k in keys}
        summary.setdefault("lpips", None)
        fid = self.fid()
        summary["fid"] = None if fid is None else float(np.mean(list(fid.values())))
        draws = sorted({r["draw"] for r in self.rows})
        per_draw = [{"draw": d, **{k: float(np.mean([r[k] for r in self.rows if r["draw"] == d])) for k in keys},
                     "fid": None if fid is None else fid[d]} for d in draws] if len(draws) > 1 else []
        return {"images": len({r["name"] for r in self.rows}), "draws": len(draws), "per_draw": per_draw,
                "metrics": summary, "skipped": dict(self.skipped),
                "classes": self.classes.summary() if self.with_classes else {},
                "per_image": self.rows, "settings": {"hot_percentile": self.cfg.hot_percentile,
                                                     "images_with_classes": self.with_classes // len(draws)}}
