"""`train.semantic_dropout`: maps dropped to the unknown map in training, and generation without a map on such
a model (issue "Boxes, not masks")."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vis2ir.config import ConfigError
from vis2ir.errors import Vis2IRError
from vis2ir.palette import VOID, decode
from vis2ir.semantic.modes import drop_maps, unknown_maps

RUN = ["model.codec=pixel", "model.semantic.mode=channel_concat", "data.source=thermalscenes", "data.size=32",
       "data.synth_count=16", "data.val_fraction=0.2", "data.test_fraction=0.2", "data.num_workers=0",
       "train.finetune=full", "train.batch_size=2", "train.max_steps=2", "train.checkpoint_every=2",
       "train.val_every=2", "train.val_batches=1", "train.log_every=1"]


def test_drop_maps_replaces_whole_maps_with_the_unknown_map():
    maps = torch.rand(400, 3, 4, 4) * 0.5 + 0.5
    g = torch.Generator().manual_seed(0)
    dropped = drop_maps(maps, 0.3, g)
    gone = (dropped == 0).flatten(1).all(1)
    kept = (dropped == maps).flatten(1).all(1)
    assert bool((gone | kept).all())  # a map is dropped whole or kept whole
    assert 0.22 < gone.float().mean().item() < 0.38  # 120 expected of 400
    assert torch.equal(drop_maps(maps, 0.3, torch.Generator().manual_seed(0)), dropped)  # a function of the seed
    assert torch.equal(drop_maps(maps, 0.0, g), maps)
    assert not drop_maps(maps, 1.0, g).any()
    # the unknown map is black, which the palette reads as VOID everywhere
    black = (unknown_maps(maps[:1])[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert (decode(black)[0] == VOID).all()


@pytest.mark.parametrize("overrides, key", [
    (["train.semantic_dropout=1.5"], "train.semantic_dropout"),
    (["train.semantic_dropout=1"], "model.semantic.mode=none"),
    (["train.semantic_dropout=0.2", "model.semantic.mode=none"], "train.semantic_dropout"),
    (["train.semantic_dropout=0.2", "data.latent_cache=somewhere"], "train.semantic_dropout"),
])
def test_semantic_dropout_settings_are_checked(tiny_config, overrides, key):
    with pytest.raises(ConfigError, match=key):
        tiny_config("model.semantic.mode=channel_concat", *overrides)


def test_training_with_dropout_draws_the_same_maps_on_every_run(tiny_config, tmp_path, monkeypatch):
    """The dropped maps are drawn from the step's seeded generator: two runs drop the same samples."""
    from vis2ir.train import module, train

    seen = []
    real = module.drop_maps

    def spy(sem, p, g):
        out = real(sem, p, g)
        seen.append((out.flatten(1) == 0).all(1).tolist())
        return out

    monkeypatch.setattr(module, "drop_maps", spy)
    for k in range(2):
        train(tiny_config(*RUN, "train.semantic_dropout=0.5", f"train.output_dir={tmp_path / f'run{k}'}"),
              progress=False)
    assert len(seen) == 4 and seen[:2] == seen[2:]


def test_a_model_trained_with_dropout_generates_without_a_map(tiny_config, tmp_path, caplog):
    from vis2ir.generate import run_generate
    from vis2ir.pipeline import Vis2IRPipeline
    from vis2ir.train import train

    run_dir = train(tiny_config(*RUN, "train.semantic_dropout=0.5", f"train.output_dir={tmp_path / 'run'}"),
                    progress=False)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(photos / f"p{k}.png")
    pipe = Vis2IRPipeline.from_checkpoint(run_dir, "cpu")
    photo = Image.open(photos / "p0.png")
    without = pipe(photo, output_type="np").images[0]
    black = pipe(photo, [Image.new("RGB", photo.size)], output_type="np").images[0]
    assert np.array_equal(without, black)  # no map is the all-unknown map the model was trained on
    summary = run_generate(photos, tmp_path / "out", checkpoint=run_dir)
    assert sorted(summary.done) == ["p0", "p1"] and (tmp_path / "out" / "p1.png").is_file()

    # a model trained without dropout still needs its maps, and says how to go without
    plain = train(tiny_config(*RUN, f"train.output_dir={tmp_path / 'plain'}"), progress=False)
    with pytest.raises(Vis2IRError, match="train.semantic_dropout"):
        Vis2IRPipeline.from_checkpoint(plain, "cpu")(photo)
    with pytest.raises(Vis2IRError, match="needs semantic maps.*a model trained with train.semantic_dropout"):
        run_generate(photos, tmp_path / "out2", checkpoint=plain)
    assert not Path(tmp_path / "out2" / "p0.png").exists()
