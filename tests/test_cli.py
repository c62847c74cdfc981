"""The `vis2ir` command line: overrides anywhere, one-line errors before the heavy imports."""

import subprocess
import sys
from pathlib import Path

import pytest

import vis2ir
from vis2ir.cli import build_parser, main, parse_args
from vis2ir.config import ConfigError, check_config, read_yaml


@pytest.mark.parametrize("argv, overrides, extra", [
    (["train", "data.source=X", "--resume", "DIR", "train.max_steps=1"], ["data.source=X", "train.max_steps=1"],
     {"resume": "DIR"}),
    (["train", "--resume", "DIR", "a.b=1", "c=2"], ["a.b=1", "c=2"], {"resume": "DIR"}),
    (["train", "a=1", "--config", "c.yaml", "b=2"], ["a=1", "b=2"], {"config": "c.yaml"}),
    (["data", "inspect", "a=1", "SRC", "--out", "x.png", "b=2"], ["a=1", "b=2"], {"source": "SRC", "out": "x.png"}),
    (["data", "inspect", "--count", "2", "SRC", "a=1", "--out", "x.png", "b=2"], ["a=1", "b=2"],
     {"source": "SRC", "count": 2}),
    (["generate", "--input", "i", "a=1", "--out", "o", "b=2", "--compare"], ["a=1", "b=2"], {"compare": True}),
    (["evaluate", "a=1", "--pred", "p", "--truth", "t", "b=2"], ["a=1", "b=2"], {"pred": "p"}),
    (["ablate", "--grid", "model.semantic.mode=none,in_context", "x=1"], ["x=1"],
     {"grid": ["model.semantic.mode=none,in_context"]}),
])
def test_overrides_stand_anywhere_among_the_arguments(argv, overrides, extra):
    args = parse_args(build_parser(), argv)
    assert args.overrides == overrides
    assert {k: getattr(args, k) for k in extra} == extra


def test_stray_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(build_parser(), ["train", "--resume", "DIR", "oops"])
    assert err.value.code == 2 and "unrecognized arguments: oops" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["segment", "--input", "i", "--out", "o", "a=1"])
    assert "takes no key=value settings: a=1" in capsys.readouterr().err


def test_inspect_takes_overrides_after_options(tmp_path, monkeypatch, caplog):
    """End to end: `data inspect --out X SOURCE key=value --count N key=value`."""
    import logging

    caplog.set_level(logging.INFO)
    sheet = tmp_path / "s.png"
    assert main(["data", "inspect", "--out", str(sheet), "thermalscenes", "data.synth_count=40", "--count", "2",
                 "data.val_fraction=0.5", "model.semantic.mode=none"]) == 0
    assert sheet.is_file() and "samples: train " in caplog.text
    counts = caplog.text.split("samples: ")[1].split("\n")[0]
    assert sum(int(part.split()[1]) for part in counts.split(", ")) == 40


def test_yaml_errors_give_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  semantic:\n    mode: none\n   num_heads: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4:\d+: not valid YAML: "):
        read_yaml(bad)
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:4:" in err


def test_check_config_checks_keys_and_types_only():
    check_config(None, ["model.semantic.num_heads=7"])  # a range that depends on the base: not checked here
    with pytest.raises(ConfigError, match="unknown setting 'train.max_step'; did you mean 'train.max_steps'"):
        check_config(None, ["train.max_step=3"])
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        check_config(None, ["train.max_steps=many"])


HEAVY = ("torch", "lightning", "diffusers", "transformers")


def _fresh(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(vis2ir.__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_config_and_cli_import_no_torch(tmp_path):
    proc = _fresh("import sys, vis2ir.cli, vis2ir.config; vis2ir.cli.build_parser()\n"
                  f"print([m for m in {HEAVY!r} if m in sys.modules])", tmp_path)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [
    ["train", "train.max_step=1"],
    ["train", "--resume", "somewhere", "train.max_step=1"],
    ["generate", "--checkpoint", "runs/x", "--input", "a.png", "--out", "o", "train.max_step=1"],
    ["visualize", "--input", "a.png", "--out", "o", "train.max_step=1"],
    ["evaluate", "--pred", "p", "--truth", "t", "train.max_step=1"],
    ["data", "inspect", "thermalscenes", "train.max_step=1"],
    ["data", "cache", "--out", "c", "train.max_step=1"],
    ["data", "convert", "src", "--out", "c", "train.max_step=1"],
    ["ablate", "--grid", "train.seed=0,1", "train.max_step=1"],
    ["demo", "train.max_step=1"],
])
def test_a_typo_is_answered_before_torch_is_imported(argv, tmp_path):
    """Checked in a fresh process's `sys.modules` (not by timing): the error, exit 2, no torch or Lightning."""
    proc = _fresh(f"import sys\nfrom vis2ir.cli import main\ncode = main({argv!r})\n"
                  f"print(code, [m for m in {HEAVY!r} if m in sys.modules])", tmp_path)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "vis2ir: error: unknown setting 'train.max_step'; did you mean 'train.max_steps'? (valid here: "
        + proc.stderr.split("(valid here: ")[1].strip()]
