"""The README's first hour, as written: its Python example, and the fine-tune recipe from a folder of
pairs (inspect -> train from the shipped model -> generate -> evaluate). Both read their code from
README.md, so the README cannot drift from what works."""

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from vis2ir.cli import main
from vis2ir.data import write_thermalscenes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_block(heading: str, language: str, contains: str = "") -> str:
    """The first ```language block after `heading` (that holds `contains`)."""
    section = README[README.index(heading):]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    return next(b for b in blocks if contains in b)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1 / np.mean((a - b) ** 2)))


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """On the CPU (device chosen automatically), with the checkpoint's own sampling settings (16 steps,
    guidance 1 for the shipped model: the README's former steps=28, guidance=50 gave a poor image)."""
    code = readme_block("Python API", "python", "Vis2IRPipeline.from_checkpoint")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["pipe"].device.type == "cpu" and namespace["pipe"].cfg.sample.steps == 16
    out = np.asarray(Image.open(tmp_path / "scene_ir.png"), dtype=np.float64) / 255
    truth = np.asarray(Image.open(tmp_path / "scenes" / "infrared" / "scene_000000.png").convert("L")) / 255
    assert out.shape == truth.shape == (64, 64)
    assert psnr(out, truth) > 15  # the shipped model: about 21 dB on held-out scenes (docs/demo.md)


def llvip_folder(root: Path, count: int, test_every: int) -> Path:
    """ThermalScenes arranged as LLVIP: {visible,infrared,semantic}/{train,test}/NAME.png."""
    scenes = write_thermalscenes(root / "scenes", count=count, size=64, seed=11)
    data = root / "mydata"
    for i, path in enumerate(sorted((scenes / "visible").iterdir())):
        split = "test" if i % test_every == 0 else "train"
        for kind in ("visible", "infrared", "semantic"):
            (data / kind / split).mkdir(parents=True, exist_ok=True)
            shutil.copy(scenes / kind / path.name, data / kind / split / path.name)
    shutil.rmtree(scenes)
    return data


def test_finetune_recipe_end_to_end(tmp_path, monkeypatch, caplog):
    """The README's commands, run in a folder holding `mydata` (24 pairs, 2 of them test) and `configs/`,
    shortened for CI: 2 training steps, 2 denoising steps. 22 training pairs leave the carved validation
    split empty at the default val_fraction: training goes on with a warning."""
    commands = [shlex.split(line) for line in readme_block("## Fine-tune the shipped model", "bash").splitlines()
                if line.startswith("vis2ir ")]
    assert [c[1] for c in commands] == ["data", "train", "generate", "evaluate"]
    llvip_folder(tmp_path, count=24, test_every=12)
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    shorter = {"train": ["train.max_steps=2"], "generate": ["--steps", "2"]}
    for argv in commands:
        assert main(argv[1:] + shorter.get(argv[1], [])) == 0, argv
    assert "the validation split is empty" in caplog.text
    assert (tmp_path / "runs" / "mine-sheet.png").exists()
    saved = yaml.safe_load((tmp_path / "runs" / "mine" / "checkpoints" / "step-2" / "config.yaml").read_text())
    assert saved["train"]["init_from"] == "demo" and saved["data"]["source"] == "mydata"
    assert sorted(p.name for p in (tmp_path / "runs" / "mine" / "infrared").glob("*.png")) == \
        ["scene_000000.png", "scene_000012.png"]
    metrics = json.loads((tmp_path / "runs" / "mine" / "evaluation" / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["metrics"]["psnr_native"] > 5
