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


# -- settings every command shares: --device, seeds; data synth's shapes -----------------------------------


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """A folder with one small photo and its semantic map (a ThermalScene), for `generate`."""
    from PIL import Image

    from vis2ir.data.thermalscenes import render_scene

    root = tmp_path_factory.mktemp("photos")
    scene = render_scene(3, size=32)
    Image.fromarray(scene.visible).save(root / "a.png")
    (root / "maps").mkdir()
    Image.fromarray(scene.semantic).save(root / "maps" / "a.png")
    return root


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vis2ir: error: "), err
    return err


@pytest.mark.parametrize("device, expected", [
    ("bogus", "--device 'bogus': expected cpu, cuda or cuda:N"),
    ("cuda:x", "--device 'cuda:x': expected cpu, cuda or cuda:N"),
    ("mps", "--device 'mps': expected cpu, cuda or cuda:N"),
    ("cuda", "--device 'cuda': CUDA is not available on this machine"),
    ("cuda:7", "--device 'cuda:7': CUDA is not available on this machine"),
])
@pytest.mark.parametrize("command", ["app", "generate", "evaluate-checkpoint", "evaluate-folders", "ablate"])
def test_a_bad_device_is_one_line_in_every_command(command, device, expected, photo_dir, tmp_path, capsys,
                                                   monkeypatch):
    """`--device` is checked once (io.runtime.default_device) before any model loads, in every command."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if command == "app":
        pytest.importorskip("gradio")
        import vis2ir.app

        monkeypatch.setattr(vis2ir.app, "load_models", lambda *a, **k: pytest.fail("models loaded"))
    port = _free_port()
    argv = {
        "app": ["app", "--port", str(port)],
        "generate": ["generate", "--checkpoint", "demo", "--input", str(photo_dir / "a.png"), "--semantic",
                     str(photo_dir / "maps" / "a.png"), "--out", str(tmp_path / "out")],
        "evaluate-checkpoint": ["evaluate", "--checkpoint", "demo", "--limit", "1", "--out", str(tmp_path / "ev")],
        "evaluate-folders": ["evaluate", "--pred", str(photo_dir), "--truth", str(photo_dir), "--out",
                             str(tmp_path / "ev")],
        "ablate": ["ablate", "--config", "configs/demo.yaml", "--grid", "train.max_steps=1", "--out",
                   str(tmp_path / "ab")],
    }[command]
    assert main([*argv, "--device", device]) == 2
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "ab" / "variants").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv", [
    ["sample.seed=1180591620717411303424"],  # 2**70: torch's generator overflowed with a traceback
    ["--seed", "1180591620717411303424"],
    ["--seed", "-1"],
    ["--steps", "0"],  # was taken as "the default" (steps or sample.steps)
])
def test_generate_refuses_a_seed_or_steps_out_of_range_in_one_line(argv, photo_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--checkpoint", "demo", "--input", str(photo_dir / "a.png"), "--semantic",
                 str(photo_dir / "maps" / "a.png"), "--out", str(out), *argv]) == 2
    err = _one_line_error(capsys)
    assert ("sample.seed: expected an integer from 0 to 4294967295" in err if "seed" in " ".join(argv)
            else "sample.steps: expected an integer >= 1, got 0" in err)
    assert not list(out.rglob("*.png"))


@pytest.mark.parametrize("argv, expected", [
    (["data", "synth", "--seed", "-1"], "--seed: expected an integer from 0 to 4294967295"),
    (["ablate", "--config", "configs/demo.yaml", "--grid", "train.max_steps=1", "--seeds", "0,4294967296"],
     "--seeds '0,4294967296': each seed must be an integer from 0 to 4294967295"),
    (["config", "show", "train.seed=4294967296"], "train.seed: expected an integer from 0 to 4294967295"),
])
def test_every_command_line_seed_is_bounded(argv, expected, tmp_path, capsys):
    if argv[:2] == ["data", "synth"]:
        argv = [*argv, "--out", str(tmp_path / "s"), "--count", "1"]
    elif argv[0] == "ablate":
        argv = [*argv, "--out", str(tmp_path / "ab")]
    assert main(argv) == 2
    assert expected in _one_line_error(capsys)


@pytest.mark.parametrize("argv, expected", [
    (["--shapes", "100000x100000"], "with sides from 16 to 16384 pixels"),  # was a numpy MemoryError
    (["--shapes", "10000x10000"], "at most 89478485 pixels (the image reader's limit"),
    (["--shapes", "\uff16\uff14x64"], "expected WIDTHxHEIGHT"),  # fullwidth digits: str.isdigit() took them
    (["--shapes", "\u0664\u0660x64"], "expected WIDTHxHEIGHT"),  # Arabic-Indic digits
    (["--width", "64", "--height", "100000"], "with sides from 16 to 16384 pixels"),
    (["--size", "100000"], "synth: expected scenes with sides from 16 to 16384 pixels, got 100000x100000"),
    (["--size", "64", "--shapes", "64x32"], "--size makes square scenes"),  # --size was silently ignored
    (["--size", "64", "--width", "64", "--height", "32"], "--size makes square scenes"),
])
def test_data_synth_refuses_shapes_it_cannot_make_in_one_line(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VIS2IR_MAX_IMAGE_PIXELS", raising=False)
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--count", "1", *argv]) == 2
    assert expected in _one_line_error(capsys)
    assert not list(tmp_path.rglob("*.png"))


def test_data_synth_sizes(tmp_path):
    """Without --size, --shapes and --width/--height: 256 squares; --shapes takes x or X."""
    from PIL import Image

    assert main(["data", "synth", "--out", str(tmp_path / "a"), "--count", "1"]) == 0
    assert Image.open(tmp_path / "a" / "visible" / "scene_000000.png").size == (256, 256)
    assert main(["data", "synth", "--out", str(tmp_path / "b"), "--count", "1", "--shapes", "64X32"]) == 0
    assert Image.open(tmp_path / "b" / "visible" / "scene_000000.png").size == (64, 32)
