"""`vis2ir config show`: every setting with its value and its meaning, from the schema's own comments."""

from pathlib import Path

import yaml

from vis2ir.cli import main
from vis2ir.config import Config, describe_settings, from_dict, load_config, setting_meanings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_setting_has_a_meaning():
    meanings = setting_meanings()
    keys = set(Config().flat())
    assert keys <= meanings.keys()
    assert not [k for k in keys if not meanings[k].strip()], "a setting without a meaning in the schema"
    # Meanings are read from the comments: these are the comment above a field and the one beside it.
    assert meanings["model.semantic.inject_into"].startswith("condition: the adapter acts on the clean")
    assert meanings["train.init_from"].endswith("or demo (the shipped model)")
    assert meanings["model.semantic"] == "How the semantic map conditions the model (docs/design.md §5)."


def test_show_is_a_config_file_of_the_same_settings(tmp_path):
    cfg = load_config(CONFIGS / "finetune_demo.yaml", ["train.batch_size=3"])
    text = describe_settings(cfg)
    assert "  batch_size: 3  # samples per device and micro-batch" in text
    assert "  init_from: demo  # start from a checkpoint's weights" in text
    assert from_dict(Config, yaml.safe_load(text)).validate() == cfg
    saved = tmp_path / "shown.yaml"
    saved.write_text(text)
    assert load_config(saved) == cfg


def test_config_show_command(capsys):
    assert main(["config", "show", "--config", str(CONFIGS / "demo.yaml"), "sample.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "  steps: 7  # denoising steps\n" in out and out.startswith("model:  # The backbone")
    assert main(["config", "show", "sample.stpes=7"]) == 2
    assert "unknown setting 'sample.stpes'; did you mean 'sample.steps'?" in capsys.readouterr().err
