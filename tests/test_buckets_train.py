"""Training, caching and generating at the data's own aspect ratio (`data.resize_policy: bucket`)."""

import json
import logging
import socket

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from vis2ir.checkpoint import list_checkpoints
from vis2ir.cli import main
from vis2ir.config import load_config
from vis2ir.data import build_dataset, write_thermalscenes
from vis2ir.latent_cache import LatentCache, build_latent_cache
from vis2ir.model import build_model
from vis2ir.train import train

from tests.conftest import TINY_MODEL
from tests.data.datafiles import write_pair
from tests.test_train import TINY_RUN, weights

# 12 scenes in turn 160×96, 64×64, 96×160, 64×64: at size 64 the buckets 80×48 (3), 64×64 (6), 48×80 (3).
MIXED = [(160, 96), (64, 64), (96, 160), (64, 64)]
BUCKETED = ["data.size=64", "data.resize_policy=bucket", "data.val_fraction=0", "data.test_fraction=0"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    write_thermalscenes(root, 12, seed=2, shapes=MIXED)
    return root


class RecordBatches(L.Callback):
    """Each training batch's visible shape and names, by step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps.append([list(batch["visible"].shape), list(batch["name"])])


def test_bucketed_training_batches_one_shape_and_resumes_exactly(tiny_config, tmp_path, mixed):
    def run(name, steps, resume=None):
        record = RecordBatches()
        cfg = tiny_config(*TINY_RUN, f"data.source={mixed}", *BUCKETED, f"train.max_steps={steps}",
                          "train.checkpoint_every=2", "train.val_every=100", f"train.output_dir={tmp_path / name}")
        return train(cfg, resume=resume, progress=False, callbacks=[record]), record.steps

    straight, seen = run("straight", 6)
    assert all(len(names) == 2 for _, names in seen)
    assert len({tuple(shape[2:]) for shape, _ in seen}) == 3  # every bucket came up: (48, 80), (64, 64), (80, 48)
    stopped, first = run("stopped", 3)
    resumed, rest = run("stopped", 6, resume="latest")
    assert first + rest == seen  # the same batches in the same order
    a, b = weights(straight / "checkpoints" / "step-6"), weights(resumed / "checkpoints" / "step-6")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _ddp_rank(rank: int, tmp: str, port: int, source: str) -> None:
    """One of two DDP processes (gloo, CPU): 7 steps, then a resume from step 4; writes each launch's
    batches (shape, names) per step."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    cfg = load_config(None, [*TINY_MODEL, f"model.prompt_cache_dir={tmp}/prompt_cache", *TINY_RUN,
                             f"data.source={source}", *BUCKETED, f"train.output_dir={tmp}/run",
                             "train.strategy=ddp", "train.devices=2", "train.accelerator=cpu",
                             "train.batch_size=1", "train.checkpoint_every=2", "train.val_every=100",
                             "train.max_steps=7"])
    launches = []
    for resume in (None, f"{tmp}/run/checkpoints/step-4"):
        record = RecordBatches()
        train(cfg, resume=resume, progress=False, callbacks=[record])
        launches.append(record.steps)
    with open(f"{tmp}/batches-{rank}.json", "w") as f:
        json.dump(launches, f)


def test_ddp_ranks_share_each_steps_bucket(tmp_path, mixed):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_rank, args=(str(tmp_path), port, str(mixed)), nprocs=2)
    (straight0, resumed0), (straight1, resumed1) = (json.loads((tmp_path / f"batches-{r}.json").read_text())
                                                    for r in (0, 1))
    assert len(straight0) == len(straight1) == 7
    for (shape0, names0), (shape1, names1) in zip(straight0, straight1):
        assert shape0 == shape1 and names0 != names1  # the same bucket, different samples
    # 7 steps × 2 samples = one epoch: 3 + 1 repeat of 80×48, 6 of 64×64, 3 + 1 repeat of 48×80 (every
    # bucket holds a global batch of 2, and 2 repeats are at most one global batch: nothing is merged).
    assert sorted(tuple(s[2:]) for s, _ in straight0) == [(48, 80)] * 2 + [(64, 64)] * 3 + [(80, 48)] * 2
    assert resumed0 == straight0[4:] and resumed1 == straight1[4:]


def test_the_cache_of_mixed_buckets_equals_encoding_on_the_fly(tiny_config, tmp_path, mixed):
    cfg = tiny_config(*TINY_RUN, f"data.source={mixed}", *BUCKETED)
    build_latent_cache(cfg, tmp_path / "cache", batch_size=2)
    cache = LatentCache(tmp_path / "cache", cfg)
    images = build_dataset(tiny_config(*TINY_RUN, f"data.source={mixed}", *BUCKETED, "data.hflip=false").data,
                           "train")
    assert cache.shapes == images.shapes and len(set(cache.shapes)) == 3
    model = build_model(cfg)
    for i in range(len(images)):
        sample = images[i]
        with torch.random.fork_rng():
            torch.manual_seed(i)
            flipped = bool(torch.rand(()) < 0.5)
            torch.manual_seed(i)
            got = cache[i]
        vis, ir, sem = (sample[k][None].flip(-1) if flipped else sample[k][None]
                        for k in ("visible", "infrared", "semantic"))
        enc = model.encode(vis, ir, sem)
        w, h = images.shapes[i]
        assert got["name"] == sample["name"] and got["panel_size"] == (h, w)
        assert torch.equal(got["x_0"], enc.x_0[0]) and torch.equal(got["x_cond"], enc.x_cond[0])
        assert torch.equal(got["semantic_tokens"], enc.semantic_tokens[0])


def test_llvip_pairs_of_640x512_train_at_5_4_and_generate_at_640x512(tiny_config, tmp_path, caplog):
    """End to end on the CPU: an LLVIP-layout folder of 640×512 pairs trains with 160×128 panels (the 5:4
    bucket of size 144; `--debug` shows it), and a 640×512 photo comes back 640×512."""
    root = tmp_path / "llvip"
    for k in range(6):
        split = "test" if k == 5 else "train"
        write_pair(root / "visible" / split / f"{k:06d}.jpg", root / "infrared" / split / f"{k:06d}.jpg", k,
                   sem=root / "semantic" / split / f"{k:06d}.png", size=(512, 640))
    overrides = [*TINY_MODEL, f"model.prompt_cache_dir={tmp_path / 'prompts'}", "model.codec=pixel",
                 "model.semantic.mode=channel_concat", "model.lora.rank=4", f"data.source={root}", "data.size=144",
                 "data.resize_policy=bucket", "data.val_fraction=0.2", "data.num_workers=0", "train.batch_size=2",
                 "train.max_steps=2", "train.val_every=2", "train.val_batches=1", f"train.output_dir={tmp_path / 'run'}"]
    caplog.set_level(logging.DEBUG, logger="vis2ir.train")
    assert main(["--debug", "train", *overrides]) == 0
    assert "visible_img: (2, 3, 128, 160)" in caplog.text and "canvas: (2, 3, 128, 320)" in caplog.text
    assert list_checkpoints(tmp_path / "run")[-1].name == "step-2"
    assert (tmp_path / "run" / "samples" / "step-2.png").exists()  # the validation grid, at 5:4
    out = tmp_path / "ir"
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--input", str(root / "visible" / "test"),
                 "--semantic", str(root / "semantic" / "test"), "--out", str(out)]) == 0
    with Image.open(out / "000005.png") as image:
        assert image.size == (640, 512)
        assert np.asarray(image).std() > 0
    # evaluate --checkpoint scores at the data's aspect (the bucket), and says how ThermalGen's square treats it
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "eval")]) == 0
    with Image.open(tmp_path / "eval" / "pred" / "test" / "000005.png") as image:
        assert image.size == (160, 128)
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())["scored"]
    assert "native: each sample's aspect-ratio bucket (160×128)" in scored["resolution"]
    assert "256×256" in scored["resolution"] and "aspect ratio is not kept" in scored["resolution"]
    assert "aspect-ratio buckets" in scored["truth"]
    # …generated at the bucket it trained at (auto), the tiny model's 5:4 output resized back to 640×512.
    from vis2ir.pipeline import Vis2IRPipeline

    pipe = Vis2IRPipeline.from_checkpoint(tmp_path / "run")
    seen = []
    pipe.model.encode = lambda vis, *a, encode=pipe.model.encode: seen.append(tuple(vis.shape)) or encode(vis, *a)
    visible = Image.open(root / "visible" / "test" / "000005.jpg")
    assert pipe(visible, semantic=Image.open(root / "semantic" / "test" / "000005.png"), steps=1).images[0].size \
        == (640, 512)
    assert seen[0][-2:] == (128, 160)
