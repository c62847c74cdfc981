"""A latent cache is keyed by its split and its source's content, not by the settings alone (issue 26, item 7)."""

import os

import pytest

from vis2ir.cli import main
from vis2ir.data import write_thermalscenes
from vis2ir.data.fingerprint import data_fingerprint, describe_difference
from vis2ir.errors import Vis2IRError
from vis2ir.latent_cache import LatentCache, build_latent_cache

from tests.data.datafiles import write_pair
from tests.test_latent_cache import cfg_overrides
from tests.test_train import TINY_RUN

SPLITS = ["data.val_fraction=0.25", "data.test_fraction=0.25"]


@pytest.fixture
def folder(tmp_path):
    write_thermalscenes(tmp_path / "data", 16, size=32, seed=3)
    return tmp_path / "data"


def folder_cfg(tiny_config, folder, *more):
    return tiny_config(*TINY_RUN, f"data.source={folder}", *SPLITS, *more)


def test_a_cache_of_the_test_split_is_refused_for_training_and_the_command_says_so(tiny_config, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(["data", "cache", "--out", str(out), "--split", "test", *TINY_RUN, *cfg_overrides(tiny_config)]) == 0
    said = capsys.readouterr().out
    assert "train with" not in said and "not the training split" in said and "--split train" in said
    with pytest.raises(Vis2IRError, match=r"a cache of the 'test' split, but training reads the 'train' split; "
                                          r"make a cache that fits this run with: vis2ir data cache --split train "
                                          rf"--out {tmp_path / 'cache_train'} .* ; then train with "
                                          rf"data.latent_cache={tmp_path / 'cache_train'}$") as err:
        LatentCache(out, tiny_config(*TINY_RUN))
    assert "`" not in str(err.value) and "(with this run's settings)" not in str(err.value)


def test_the_suggested_cache_command_can_be_pasted_and_makes_a_cache_that_fits(tiny_config, tmp_path, folder):
    """The refusal's command, pasted (here: split into arguments as a shell does), makes a cache in a new folder
    that the run takes; before, it was a backticked sentence reusing the refused cache's folder name."""
    import shlex

    from vis2ir.latent_cache import cache_command

    cfg = folder_cfg(tiny_config, folder)
    command = shlex.split(cache_command(tmp_path / "cache_test", cfg, "train"))
    assert command[:7] == ["vis2ir", "data", "cache", "--split", "train", "--out", str(tmp_path / "cache_train")]
    assert main(command[1:]) == 0
    LatentCache(tmp_path / "cache_train", cfg)


def test_a_changed_split_setting_is_named_not_called_a_changed_source(tiny_config, tmp_path, folder):
    """data.val_fraction (or test_fraction) changes which samples the train split holds: the refusal names the
    setting and its cached value, and the ways out; before: "its source ... changed since the cache was made"."""
    build_latent_cache(folder_cfg(tiny_config, folder), tmp_path / "cache")
    cfg = folder_cfg(tiny_config, folder, "data.val_fraction=0.4")
    with pytest.raises(Vis2IRError, match=r"made with data.val_fraction=0.25, but this run has 0.4, which changes the "
                                          r"samples of the 'train' split; set data.val_fraction=0.25 back to train "
                                          r"from this cache, or make a cache that fits this run with: vis2ir data "
                                          r"cache --split train --out \S+cache_train .*data.val_fraction=0.4") as err:
        LatentCache(tmp_path / "cache", cfg)
    assert "source" not in str(err.value).split("; ")[0]


def test_a_cache_settings_mismatch_gives_the_ways_out(tiny_config, tmp_path, folder):
    build_latent_cache(folder_cfg(tiny_config, folder, "data.hflip=true"), tmp_path / "cache")
    with pytest.raises(Vis2IRError, match=r"made with data.hflip=True, but this run has False; set data.hflip=True "
                                          r"back to train from this cache, or make a cache that fits this run with: "
                                          r"vis2ir data cache --split train --out \S+cache_train .*data.hflip=false"):
        LatentCache(tmp_path / "cache", folder_cfg(tiny_config, folder, "data.hflip=false"))


def test_a_cache_whose_source_changed_is_refused_naming_what_changed(tiny_config, tmp_path, folder):
    cfg = folder_cfg(tiny_config, folder)
    build_latent_cache(cfg, tmp_path / "cache")
    train_names = sorted(LatentCache(tmp_path / "cache", cfg).meta["names"])
    name = train_names[0]
    vis, ir = folder / "visible" / f"{name}.png", folder / "infrared" / f"{name}.png"
    saved = vis.read_bytes(), ir.read_bytes()
    write_pair(vis, ir, 40, size=32)  # other pixels, same name
    with pytest.raises(Vis2IRError, match=rf"changed since the cache was made: 1 changed \(e.g. {name}\) samples "
                                          r"of the 'train' split; make a cache that fits this run with: vis2ir data "
                                          r"cache --split train"):
        LatentCache(tmp_path / "cache", cfg)
    vis.write_bytes(saved[0])  # the same bytes back, new times: the same data
    ir.write_bytes(saved[1])
    LatentCache(tmp_path / "cache", cfg)
    os.utime(vis, ns=(1, 1))  # touched only (a copy without times): still the same data
    LatentCache(tmp_path / "cache", cfg)


def test_added_and_removed_samples_are_named(tiny_config, tmp_path, folder):
    cfg = folder_cfg(tiny_config, folder)
    build_latent_cache(cfg, tmp_path / "cache")
    before = data_fingerprint(cfg.data, "train")
    names = sorted(LatentCache(tmp_path / "cache", cfg).meta["names"])
    for k in range(40, 60):  # new samples; some fall in the train split (by the hash of their name)
        write_pair(folder / "visible" / f"new_{k}.png", folder / "infrared" / f"new_{k}.png", k, size=32)
    with pytest.raises(Vis2IRError, match=r"changed since the cache was made: \d+ added \(e.g. new_\d+\) samples"):
        LatentCache(tmp_path / "cache", cfg)
    after = data_fingerprint(cfg.data, "train")
    assert after["count"] > before["count"] and "samples then" in describe_difference(before, after)
    for kind in ("visible", "infrared", "semantic"):
        for p in (folder / kind).glob("new_*"):
            p.unlink()
    for kind in ("visible", "infrared", "semantic"):
        (folder / kind / f"{names[0]}.png").unlink()
    with pytest.raises(Vis2IRError, match=rf": 1 removed \(e.g. {names[0]}\) samples"):
        LatentCache(tmp_path / "cache", cfg)


def test_the_fingerprint_tells_split_count_names_and_files(tiny_config, folder):
    cfg = folder_cfg(tiny_config, folder)
    a = data_fingerprint(cfg.data, "train")
    assert a["split"] == "train" and a["count"] == len([r for r in os.listdir(folder / "visible")]) - sum(
        data_fingerprint(cfg.data, s)["count"] for s in ("val", "test"))
    assert data_fingerprint(cfg.data, "train") == a and describe_difference(a, a) == ""
    assert "split 'train' then, 'test' now" in describe_difference(a, data_fingerprint(cfg.data, "test"))
    for path in (folder / "semantic").iterdir():
        os.utime(path, ns=(5, 5))
    changed = data_fingerprint(cfg.data, "train")
    assert changed["names"] == a["names"] and changed["digest"] != a["digest"]
    assert describe_difference(a, changed) == "files of the same samples changed (size or modification time)"
    synth = data_fingerprint(tiny_config(*TINY_RUN).data, "train")
    assert synth != data_fingerprint(tiny_config(*TINY_RUN, "data.synth_seed=9").data, "train")


def test_a_refused_train_launch_leaves_nothing_in_the_output_folder(tiny_config, tmp_path, folder):
    """A launch refused for its cache (another split here) or for its data (a name in two split lists, found as
    the loaders start) left config.yaml, logs/ and tensorboard/ in its output folder; now nothing new."""
    from vis2ir.train import train

    build_latent_cache(folder_cfg(tiny_config, folder), tmp_path / "cache_test", split="test")
    out = tmp_path / "runs" / "refused"
    cfg = folder_cfg(tiny_config, folder, f"data.latent_cache={tmp_path / 'cache_test'}", "train.max_steps=2",
                     f"train.output_dir={out}")
    with pytest.raises(Vis2IRError, match="a cache of the 'test' split"):
        train(cfg, progress=False)
    assert not out.exists()
    names = sorted(p.stem for p in (folder / "visible").iterdir())
    (folder / "train.txt").write_text("".join(f"{n}\n" for n in names))
    (folder / "test.txt").write_text(f"{names[0]}\n")
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(Vis2IRError, match=r"is listed in both .*train\.txt and .*test\.txt"):
        train(folder_cfg(tiny_config, folder, "train.max_steps=2", f"train.output_dir={out}"), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
