"""Reference predictors of the infrared image, fitted on training samples (rows of the ablation table).

- `ConstantPredictor`: the mean infrared of the training set, everywhere.
- `ColourLookupPredictor`: the mean infrared of each quantised visible colour — the best a model can
  do from the visible pixel alone.
- `ClassMeanPredictor`: the mean infrared of each semantic class — an oracle given the class map.

Each has `fit(samples)` (an iterable of samples or batches: dicts with `visible`, `infrared` and,
for the class oracle, `classes` or `semantic`; read once, as a stream) and `predict(sample)`, which
returns an infrared image
shaped like `sample["infrared"]` (grey replicated to 3 channels).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vis2ir.palette import NUM_CLASSES, decode_classes


def infrared_grey(sample: dict) -> torch.Tensor:
    """The infrared target as one channel `[..., H, W]`."""
    return sample["infrared"].float().mean(dim=-3)


@dataclass
class ConstantPredictor:
    value: float

    @classmethod
    def fitter(cls) -> MeanFitter:
        return MeanFitter(lambda s: torch.zeros(infrared_grey(s).shape, dtype=torch.long), 1,
                          lambda means: cls(float(means[0])))

    @classmethod
    def fit(cls, samples: Iterable[dict]) -> ConstantPredictor:
        return fit_all({"fit": cls.fitter()}, samples)["fit"]

    def predict(self, sample: dict) -> torch.Tensor:
        return torch.full_like(sample["infrared"], self.value, dtype=torch.float32)


@dataclass
class ColourLookupPredictor:
    """Mean infrared per visible colour, each channel quantised to `levels` bins."""

    levels: int
    means: torch.Tensor  # [levels ** 3], the training mean where a colour was never seen

    @classmethod
    def fitter(cls, levels: int = 16) -> MeanFitter:
        return MeanFitter(lambda s: _colour_keys(s["visible"], levels), levels**3, lambda means: cls(levels, means))

    @classmethod
    def fit(cls, samples: Iterable[dict], levels: int = 16) -> ColourLookupPredictor:
        return fit_all({"fit": cls.fitter(levels)}, samples)["fit"]

    def predict(self, sample: dict) -> torch.Tensor:
        return _expand(_lookup(self.means, _colour_keys(sample["visible"], self.levels)), sample)


@dataclass
class ClassMeanPredictor:
    """Mean infrared per semantic class (palette ids; VOID pixels get the overall mean)."""

    means: torch.Tensor  # [NUM_CLASSES + 1]; index 0 is VOID

    @classmethod
    def fitter(cls) -> MeanFitter:
        return MeanFitter(_class_keys, NUM_CLASSES + 1, cls)

    @classmethod
    def fit(cls, samples: Iterable[dict]) -> ClassMeanPredictor:
        return fit_all({"fit": cls.fitter()}, samples)["fit"]

    def predict(self, sample: dict) -> torch.Tensor:
        return _expand(_lookup(self.means, _class_keys(sample)), sample)


def fit_references(samples: Iterable[dict]) -> dict:
    """The three reference predictors, fitted in one pass over `samples` (a stream: none is kept), by
    the names the reports use."""
    return fit_all({"class_oracle": ClassMeanPredictor.fitter(), "visible_lookup": ColourLookupPredictor.fitter(),
                    "constant": ConstantPredictor.fitter()}, samples)


def fit_all(fitters: dict[str, MeanFitter], samples: Iterable[dict]) -> dict:
    """Feed every sample to every fitter, once; `{name: fitted predictor}`."""
    for sample in samples:
        for fitter in fitters.values():
            fitter.add(sample)
    return {name: fitter.result() for name, fitter in fitters.items()}


class MeanFitter:
    """Mean infrared per key over all pixels (`keys_of(sample)`: long keys `[..., H, W]` in [0, n)), from
    samples added one at a time; only per-key sums and counts are kept. `result()` builds the predictor
    (`build(means)`); keys never seen get the overall mean."""

    def __init__(self, keys_of, n: int, build):
        self.keys_of, self.n, self.build = keys_of, n, build
        self.sums = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.pending = 0

    def add(self, sample: dict) -> None:
        self.keys.append(self.keys_of(sample).reshape(-1))
        self.values.append(infrared_grey(sample).reshape(-1).double())
        self.pending += len(self.keys[-1])
        if self.pending >= 1 << 22:  # one bincount per few million pixels, not one per sample
            self._flush()

    def _flush(self) -> None:
        if self.keys:
            k, v = torch.cat(self.keys), torch.cat(self.values)
            self.sums.add_(torch.bincount(k, weights=v, minlength=self.n))
            self.counts.add_(torch.bincount(k, minlength=self.n).double())
            self.keys.clear(), self.values.clear()
        self.pending = 0

    def result(self):
        self._flush()
        overall = self.sums.sum() / self.counts.sum().clamp(min=1)
        return self.build(torch.where(self.counts > 0, self.sums / self.counts.clamp(min=1), overall).float())


def _colour_keys(visible: torch.Tensor, levels: int) -> torch.Tensor:
    q = (visible.clamp(0, 1) * levels).long().clamp(max=levels - 1)  # [..., 3, H, W]
    return (q.select(-3, 0) * levels + q.select(-3, 1)) * levels + q.select(-3, 2)


def sample_classes(sample: dict) -> torch.Tensor | None:
    """The sample's class map: its own, decoded from its semantic map, or None."""
    if "classes" in sample:
        return sample["classes"]
    return decode_classes(sample["semantic"]) if "semantic" in sample else None


def _class_keys(sample: dict) -> torch.Tensor:
    return sample_classes(sample).long() + 1  # VOID (-1) -> 0


def _lookup(table: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`table[keys]` (index_select: much faster than advanced indexing on CPU)."""
    return table.index_select(0, keys.reshape(-1)).view(keys.shape)


def _expand(grey: torch.Tensor, sample: dict) -> torch.Tensor:
    return grey.unsqueeze(-3).expand_as(sample["infrared"]).contiguous()
