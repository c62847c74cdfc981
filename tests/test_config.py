from pathlib import Path

import pytest

from vis2ir.cli import main
from vis2ir.config import Config, ConfigError, load_config

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.size % 16 == 0


def test_shipped_configs_cover_every_mode():
    modes = {load_config(p).model.semantic.mode for p in CONFIGS if p.name.startswith("vis2ir_")}
    assert modes == {"none", "pixel_fusion", "cross_attention", "in_context", "channel_concat"}
    orig = load_config(Path(CONFIGS[0]).parent / "vis2ir_cross_attention.yaml")
    assert (orig.model.flux_path, orig.model.semantic.num_layers, orig.model.semantic.num_heads) == \
        ("black-forest-labs/FLUX.1-Fill-dev", 1, 8)
    assert (orig.data.semantic_column, orig.train.batch_size) == ("panoptic_img", 4)


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["model.semantic.num_heads=16", "train.learning_rate=2e-4", "model.semantic.position=none",
                             "model.transformer.axes_dims_rope=[16, 56, 56]"])
    assert cfg.model.semantic.num_heads == 16
    assert cfg.train.learning_rate == pytest.approx(2e-4)
    assert cfg.model.semantic.position == "none"
    assert cfg.model.transformer.axes_dims_rope == (16, 56, 56)


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown setting 'model.semantic.num_head'.*did you mean 'model.semantic.num_heads'"):
        load_config(None, ["model.semantic.num_head=16"])


def test_bad_choice_lists_what_is_allowed():
    with pytest.raises(ConfigError, match=r"model.semantic.mode: 'crossattention' is not allowed; choose one of 'none', "):
        load_config(None, ["model.semantic.mode=crossattention"])


@pytest.mark.parametrize("override, message", [
    ("model.semantic.num_heads=eight", "model.semantic.num_heads: expected an integer, got 'eight'"),
    ("data.size=500", "data.size: expected a multiple of 16, got 500"),
    ("train.batch_size=0", "train.batch_size: expected an integer >= 1, got 0"),
    ("model.transformer.axes_dims_rope=[16,56,50]", "model.transformer.axes_dims_rope: expected three numbers summing"),
    ("model.codec=pixel", "model.codec: expected 'vae' with a pretrained backbone"),
    ("model.semantic=3", "model.semantic: expected a mapping"),
    ("nonsense", "override 'nonsense': expected key.path=value"),
    ("sample.adapter_scale=.nan", "sample.adapter_scale: expected a finite number, got nan"),
])
def test_bad_values_say_what_is_expected(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_xfl_config_is_honoured(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\n")
    monkeypatch.setenv("XFL_CONFIG", str(path))
    assert load_config().train.max_steps == 7
    monkeypatch.delenv("XFL_CONFIG")
    assert load_config().train.max_steps == Config().train.max_steps


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(None, ["model.semantic.mode=channel_concat", "train.output_dir=somewhere"])
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["demo", "model.semantic.num_head=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vis2ir: error: unknown setting 'model.semantic.num_head'")
    assert "\n" not in err and "Traceback" not in err
