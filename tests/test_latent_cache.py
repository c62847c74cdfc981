import json

import pytest
import torch
from safetensors.torch import load_file

from vis2ir.checkpoint import ADAPTER_FILE, LORA_FILE
from vis2ir.cli import main
from vis2ir.data import build_dataset
from vis2ir.errors import Vis2IRError
from vis2ir.latent_cache import FORMAT, MASK_KEY, LatentCache, build_latent_cache
from vis2ir.model import build_model
from vis2ir.train import train

from tests.test_train import TINY_RUN


def test_cached_latents_equal_the_codec_output(tiny_config, tmp_path):
    cfg = tiny_config(*TINY_RUN)
    build_latent_cache(cfg, tmp_path / "cache", batch_size=5)
    cache = LatentCache(tmp_path / "cache", cfg)
    images = build_dataset(tiny_config(*TINY_RUN, "data.hflip=false").data, "train")  # unflipped samples
    assert len(cache) == len(images) and cache.flips
    model = build_model(cfg)
    for i in (0, len(cache) - 1):
        sample = images[i]
        for flipped in (False, True):
            with torch.random.fork_rng():
                torch.manual_seed(0 if flipped else 1)
                want_flip = bool(torch.rand(()) < 0.5)
                torch.manual_seed(0 if flipped else 1)
                got = cache[i]
            vis, ir, sem = (sample[k][None] for k in ("visible", "infrared", "semantic"))
            if want_flip:
                vis, ir, sem = vis.flip(-1), ir.flip(-1), sem.flip(-1)
            enc = model.encode(vis, ir, sem)
            assert got["name"] == sample["name"]
            assert torch.equal(got["x_0"], enc.x_0[0]) and torch.equal(got["x_cond"], enc.x_cond[0])
            assert torch.equal(got["semantic_tokens"], enc.semantic_tokens[0])


def test_training_from_the_cache_matches_training_from_images(tiny_config, tmp_path):
    """Same positions, same flips, same noise: the weights end the same (the pixel codec is exact)."""
    assert main(["data", "cache", "--out", str(tmp_path / "cache"), *TINY_RUN, *cfg_overrides(tiny_config)]) == 0
    common = ["train.max_steps=4", "train.checkpoint_every=4", "train.val_every=100"]
    a = train(tiny_config(*TINY_RUN, *common, f"train.output_dir={tmp_path / 'images'}"), progress=False)
    b = train(tiny_config(*TINY_RUN, *common, f"train.output_dir={tmp_path / 'cached'}",
                          f"data.latent_cache={tmp_path / 'cache'}"), progress=False)
    wa = {**load_file(str(a / "checkpoints/step-4" / LORA_FILE)), **load_file(str(a / "checkpoints/step-4" / ADAPTER_FILE))}
    wb = {**load_file(str(b / "checkpoints/step-4" / LORA_FILE)), **load_file(str(b / "checkpoints/step-4" / ADAPTER_FILE))}
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def cfg_overrides(tiny_config):
    """The tiny model's overrides as command-line arguments (the CLI builds its own config)."""
    from tests.conftest import TINY_MODEL

    cfg = tiny_config()
    return [*TINY_MODEL, f"model.prompt_cache_dir={cfg.model.prompt_cache_dir}"]


def test_a_cache_made_with_other_settings_is_refused(tiny_config, tmp_path):
    build_latent_cache(tiny_config(*TINY_RUN), tmp_path / "cache")
    with pytest.raises(Vis2IRError, match=r"made with model.semantic.mode='cross_attention', but this run has 'none'"):
        LatentCache(tmp_path / "cache", tiny_config(*TINY_RUN, "model.semantic.mode=none"))
    with pytest.raises(Vis2IRError, match="no meta.json"):
        LatentCache(tmp_path / "nothing", tiny_config(*TINY_RUN))
    with pytest.raises(Vis2IRError, match="random_crop: a random crop cannot be cached"):
        build_latent_cache(tiny_config(*TINY_RUN, "data.resize_policy=random_crop"), tmp_path / "c2")


def test_the_cache_stores_what_all_samples_share_once(tiny_config, tmp_path):
    """x_cond without the Fill mask's channels (stored once per shard), half the semantic tokens;
    a cache in the older per-sample format is refused with what to do."""
    cfg = tiny_config(*TINY_RUN)
    build_latent_cache(cfg, tmp_path / "cache", batch_size=5)
    shard = load_file(str(tmp_path / "cache" / "shard-00000.safetensors"))
    full = LatentCache(tmp_path / "cache", cfg)[0]
    n, width = shard["x_0"].shape[1:]
    assert shard["x_cond"].shape[1:] == (n, width) and shard["semantic_tokens"].shape[1:] == (n // 2, width)
    assert shard[MASK_KEY].shape == (n, full["x_cond"].shape[-1] - width)
    assert full["x_cond"].shape == (n, width + shard[MASK_KEY].shape[-1])
    assert full["semantic_tokens"].shape == (n, width)
    meta_path = tmp_path / "cache" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["format"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(Vis2IRError, match=rf"made in cache format 1, but this vis2ir reads format {FORMAT}; make a cache that fits"):
        LatentCache(tmp_path / "cache", cfg)
