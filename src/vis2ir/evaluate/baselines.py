"""Reference predictors of the infrared image, fitted on training samples (rows of the ablation table).

- `ConstantPredictor`: the mean infrared of the training set, everywhere.
- `ColourLookupPredictor`: the mean infrared of each quantised visible colour — the best a model can
  do from the visible pixel alone.
- `ClassMeanPredictor`: the mean infrared of each semantic class — an oracle given the class map.

Each has `fit(samples)` (an iterable of samples or batches: dicts with `visible`, `infrared` and,
for the class oracle, `classes` or `semantic`) and `predict(sample)`, which returns an infrared image
shaped like `sample["infrared"]` (grey replicated to 3 channels).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from vis2ir.data.palette import NUM_CLASSES, decode_classes


def infrared_grey(sample: dict) -> torch.Tensor:
    """The infrared target as one channel `[..., H, W]`."""
    return sample["infrared"].float().mean(dim=-3)


@dataclass
class ConstantPredictor:
    value: float

    @classmethod
    def fit(cls, samples: Iterable[dict]) -> ConstantPredictor:
        total, count = 0.0, 0
        for sample in samples:
            ir = infrared_grey(sample)
            total, count = total + float(ir.sum()), count + ir.numel()
        return cls(total / max(count, 1))

    def predict(self, sample: dict) -> torch.Tensor:
        return torch.full_like(sample["infrared"], self.value, dtype=torch.float32)


@dataclass
class ColourLookupPredictor:
    """Mean infrared per visible colour, each channel quantised to `levels` bins."""

    levels: int
    means: torch.Tensor  # [levels ** 3], the training mean where a colour was never seen

    @classmethod
    def fit(cls, samples: Iterable[dict], levels: int = 16) -> ColourLookupPredictor:
        means = _fit_means(samples, lambda s: _colour_keys(s["visible"], levels), levels**3)
        return cls(levels, means)

    def predict(self, sample: dict) -> torch.Tensor:
        return _expand(_lookup(self.means, _colour_keys(sample["visible"], self.levels)), sample)


@dataclass
class ClassMeanPredictor:
    """Mean infrared per semantic class (palette ids; VOID pixels get the overall mean)."""

    means: torch.Tensor  # [NUM_CLASSES + 1]; index 0 is VOID

    @classmethod
    def fit(cls, samples: Iterable[dict]) -> ClassMeanPredictor:
        return cls(_fit_means(samples, _class_keys, NUM_CLASSES + 1))

    def predict(self, sample: dict) -> torch.Tensor:
        return _expand(_lookup(self.means, _class_keys(sample)), sample)


def fit_references(samples: list[dict]) -> dict:
    """The three reference predictors, fitted on `samples`, by the names the reports use."""
    kinds = {"class_oracle": ClassMeanPredictor, "visible_lookup": ColourLookupPredictor, "constant": ConstantPredictor}
    return {name: kind.fit(samples) for name, kind in kinds.items()}


def _fit_means(samples: Iterable[dict], keys_of, n: int) -> torch.Tensor:
    """Mean infrared per key over all pixels; keys never seen get the overall mean."""
    sums = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []

    def flush() -> None:  # one bincount per few million pixels, not one per sample
        k, v = torch.cat(keys), torch.cat(values)
        sums.add_(torch.bincount(k, weights=v, minlength=n))
        counts.add_(torch.bincount(k, minlength=n).double())
        keys.clear(), values.clear()

    pending = 0
    for sample in samples:
        keys.append(keys_of(sample).reshape(-1))
        values.append(infrared_grey(sample).reshape(-1).double())
        pending += len(keys[-1])
        if pending >= 1 << 22:
            flush()
            pending = 0
    if keys:
        flush()
    overall = sums.sum() / counts.sum().clamp(min=1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), overall).float()


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
