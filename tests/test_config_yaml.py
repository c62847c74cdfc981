"""YAML typing of settings: text settings keep what was written, ambiguous numbers and repeated keys are
refused in one line, in config files, command-line overrides and ablation plans alike."""

import pytest

from vis2ir.cli import main
from vis2ir.config import ConfigError, load_config
from vis2ir.evaluate.ablate import load_plan, make_variants


def test_text_settings_keep_the_plain_scalar_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  output_dir: 20241207\n  max_steps: 1_000\n"
                    "model:\n  prompt: yes\n  flux_path: 2024-12-07\n  prompt_cache_dir: 0755\n"
                    "data:\n  segment_model: 1.50\n  hflip: no\n  ir_percentiles: [1, 99]\n")
    cfg = load_config(path)
    assert cfg.train.output_dir == "20241207"
    assert (cfg.model.prompt, cfg.model.flux_path, cfg.model.prompt_cache_dir) == ("yes", "2024-12-07", "0755")
    assert cfg.data.segment_model == "1.50"
    # settings of other types keep YAML 1.1's reading
    assert cfg.train.max_steps == 1000 and cfg.data.hflip is False and cfg.data.ir_percentiles == (1.0, 99.0)


def test_text_settings_keep_the_override_as_written():
    cfg = load_config(None, ["train.output_dir=0755", "model.prompt=on", "data.hflip=off", "train.devices=2",
                             "sample.size=native", "train.learning_rate=1e-4"])
    assert (cfg.train.output_dir, cfg.model.prompt) == ("0755", "on")
    assert (cfg.data.hflip, cfg.train.devices, cfg.sample.size, cfg.train.learning_rate) == (False, 2, "native", 1e-4)


@pytest.mark.parametrize("written, number", [("0755", 493), ("1:30", 90)])
def test_numbers_yaml_reads_otherwise_are_refused(tmp_path, written, number):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  max_steps: {written}\n")
    with pytest.raises(ConfigError, match=rf"c.yaml: train.max_steps: {written} reads in YAML 1.1 as the .* number "
                                          rf"{number}; write the number you mean in decimal"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"^override train.max_steps: {written} reads in YAML 1.1 as"):
        load_config(None, [f"train.max_steps={written}"])


def test_a_key_given_twice_is_refused_at_any_level(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 10\n  output_dir: a\n  max_steps: 20\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4: key 'max_steps' given twice \(first at line 2\)"):
        load_config(path)
    path.write_text("train: {max_steps: 10}\nsample:\n  steps: 2\ntrain:\n  max_steps: 20\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4: key 'train' given twice \(first at line 1\)"):
        load_config(path)
    # YAML's merge keys may still be overridden: that is not a key given twice
    path.write_text("base: &b {steps: 2, seed: 1}\nsample:\n  <<: *b\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'base'"):
        load_config(path)
    path.with_name("d.yaml").write_text("sample:\n  seed: 1\n  seed: 2\n")
    capsys.readouterr()
    assert main(["config", "show", "--config", str(path.with_name("d.yaml"))]) == 2
    err = capsys.readouterr().err.strip()
    assert "d.yaml:3: key 'seed' given twice (first at line 2)" in err and len(err.splitlines()) == 1


def test_ablation_plans_keep_text_and_refuse_repeated_keys(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("- {model.prompt_cache_dir: [0755, yes], data.hflip: no, train.learning_rate: [0.0001]}\n")
    grid = load_plan(plan)[0]
    assert grid == [("model.prompt_cache_dir", ["0755", "yes"]), ("data.hflip", ["no"]),
                    ("train.learning_rate", ["0.0001"])]
    cfg = load_config(None, make_variants(grid, [0])[0].overrides)
    assert (cfg.model.prompt_cache_dir, cfg.data.hflip, cfg.train.learning_rate) == ("0755", False, 1e-4)
    plan.write_text("- model.semantic.mode: [none]\n  model.semantic.mode: [in_context]\n")
    with pytest.raises(ConfigError, match=r"plan.yaml:2: key 'model.semantic.mode' given twice \(first at line 1\)"):
        load_plan(plan)
