"""Issue 29, item 6: generating far above the trained size (`--size native` on a 640×512 photo with a model
trained at 64 px took 46 s and 1.1 GB) is warned about once per pipeline, with the sizes, the factor, the
transformer's extra work, the time it will take and the way out; never at the trained size (`--size auto`)."""

import logging
import re

import numpy as np
import pytest

from vis2ir.checkpoint import add_lora, save_weights
from vis2ir.config import load_config
from vis2ir.latents import patch_size
from vis2ir.model import build_model
from vis2ir.pipeline import Vis2IRPipeline

from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model saved as trained at 16-pixel panels (data.size=16)."""
    cache = tmp_path_factory.mktemp("prompt_cache")
    cfg = load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={cache}", "model.codec=pixel",
                             "model.semantic.mode=none", "model.lora.rank=2", "data.size=16", "sample.steps=3",
                             "sample.guidance=1.0"])
    model = build_model(cfg)
    add_lora(model.transformer, cfg.model.lora)
    path = tmp_path_factory.mktemp("run") / "step-1"
    save_weights(path, model, cfg)
    return path


def photo(h, w):
    return (np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "vis2ir.pipeline" and r.levelno == logging.WARNING]


def test_native_size_far_above_the_trained_size_is_warned_once_with_its_time(checkpoint, caplog):
    pipe = Vis2IRPipeline.from_checkpoint(checkpoint, device="cpu")
    assert pipe.trained_size == 16
    steps = []
    with caplog.at_level(logging.WARNING, logger="vis2ir.pipeline"):
        out = pipe(photo(48, 64), size="native", seed=0, callback=lambda done, total: steps.append((done, total)))
        pipe([photo(48, 64), photo(64, 64)], size="native", seed=0)
    assert out.images[0].size == (64, 48)
    assert steps == [(1, 3), (2, 3), (3, 3)]  # the caller's callback still sees every step
    [message] = warnings_of(caplog)
    # the tokens per step: two 64×48 panels side by side plus the 8 prompt tokens, against two 16×16 panels
    p, d = patch_size(pipe.model.codec), 2 * 16
    n, n0 = 2 * (48 // p) * (64 // p) + 8, 2 * (16 // p) ** 2 + 8
    work = n * (12 * d + 2 * n) / (n0 * (12 * d + 2 * n0))
    assert 1 < work < 10  # the 8 prompt tokens weigh on both sides: less than the 12× pixels (one decimal below 10)
    assert message.startswith(
        f"size native: generating at 64×48 pixels, 12× the pixels of the 16×16 panel this model was trained at: "
        f"about {work:.1f}× the transformer's work per step (it grows with the tokens, attention with their square), "
        f"so this batch of 1 image takes about ")
    assert message.endswith(" s (timed on its first 2 of 3 steps), and each batch of this size about as long; "
                            "--size auto generates at the trained size (sample.size=auto), or give a smaller --size")
    estimate = message.split("takes about ")[1].split(" s ")[0]
    assert re.fullmatch(r"\d+(\.\d)?", estimate)  # a figure, as `about` writes it (its value is the machine's)


def test_no_warning_at_the_trained_size_or_a_few_times_its_pixels(checkpoint, caplog):
    pipe = Vis2IRPipeline.from_checkpoint(checkpoint, device="cpu", overrides=["sample.steps=1"])
    with caplog.at_level(logging.WARNING, logger="vis2ir.pipeline"):
        pipe(photo(48, 64), size="auto", seed=0)
        pipe(photo(48, 64), seed=0)  # sample.size: auto
        pipe(photo(48, 64), size=32, seed=0)  # 32×24: 3× the trained panel's pixels
    assert warnings_of(caplog) == []
    with caplog.at_level(logging.WARNING, logger="vis2ir.pipeline"):
        pipe(photo(48, 64), size=64, seed=0)  # one step: timed on it
    [message] = warnings_of(caplog)
    assert message.startswith("size 64: generating at 64×48 pixels, 12× the pixels") and \
        "(timed on its first 1 of 1 steps)" in message


def test_a_model_built_from_a_config_has_no_trained_size_to_warn_about(checkpoint, caplog):
    from vis2ir.checkpoint import load_checkpoint_config

    pipe = Vis2IRPipeline.from_config(load_checkpoint_config(checkpoint, ["sample.steps=1"]), device="cpu")
    with caplog.at_level(logging.WARNING, logger="vis2ir.pipeline"):
        pipe(photo(48, 64), size="native", seed=0)
    assert pipe.trained_size is None and warnings_of(caplog) == []
