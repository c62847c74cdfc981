"""What every backbone that takes the photo as a reference image must do through the train loop (FLUX.1
Kontext, FLUX.2 klein): train (LoRA and full, on an nf4 base) and write a checkpoint, resume to the same weights,
and train and generate through the command line."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests import test_klein, test_kontext
from vis2ir.checkpoint import LORA_FILE, list_checkpoints
from vis2ir.train import train

RUNS = {"flux1-kontext": test_kontext.TINY_RUN, "flux2-klein": test_klein.TINY_RUN}
# 64 wide (bitsandbytes' CPU kernel packs rows in blocks of 64): the RoPE axes of each backbone's ids
WIDTH_64 = {"flux1-kontext": ("model.transformer.attention_head_dim=32", "model.transformer.axes_dims_rope=[8,12,12]"),
            "flux2-klein": ("model.transformer.attention_head_dim=32", "model.transformer.axes_dims_rope=[8,8,8,8]")}


@pytest.mark.parametrize("backbone", RUNS)
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_training_runs_and_writes_a_checkpoint(tiny_config, tmp_path, backbone, finetune):
    run_dir = train(tiny_config(*RUNS[backbone], f"train.finetune={finetune}", f"train.output_dir={tmp_path / 'run'}"),
                    progress=False)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-2"]
    metrics = (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    column = metrics[0].split(",").index("train/loss")
    losses = [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]]
    assert losses and all(np.isfinite(losses))
    if finetune == "lora":
        assert (run_dir / "checkpoints" / "step-2" / LORA_FILE).is_file()


@pytest.mark.parametrize("backbone", RUNS)
def test_resume_ends_with_the_same_weights(tiny_config, tmp_path, backbone):
    from safetensors.torch import load_file

    def run(name, steps, resume=None):
        cfg = tiny_config(*RUNS[backbone], f"train.max_steps={steps}", f"train.output_dir={tmp_path / name}")
        return train(cfg, resume=resume, progress=False)

    straight = run("straight", 4)
    run("stopped", 2)
    resumed = run("stopped", 4, resume="latest")
    a = load_file(str(straight / "checkpoints" / "step-4" / LORA_FILE))
    b = load_file(str(resumed / "checkpoints" / "step-4" / LORA_FILE))
    c = load_file(str(resumed / "checkpoints" / "step-2" / LORA_FILE))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], c[k]) for k in a)


@pytest.mark.parametrize("backbone", RUNS)
def test_lora_trains_on_a_quantized_base(tiny_config, tmp_path, backbone):
    """`model.quantize=nf4` (QLoRA): the blocks are quantized, the run writes its LoRA."""
    pytest.importorskip("bitsandbytes")
    run_dir = train(tiny_config(*RUNS[backbone], *WIDTH_64[backbone], "model.quantize=nf4",
                                f"train.output_dir={tmp_path / 'q'}"), progress=False)
    assert (run_dir / "checkpoints" / "step-2" / LORA_FILE).is_file()


@pytest.mark.parametrize("backbone", RUNS)
def test_train_and_generate_commands(tmp_path, backbone):
    """`vis2ir train` then `vis2ir generate` on a tiny random model, through the command line."""
    from tests.conftest import TINY_MODEL
    from vis2ir.cli import main

    run_dir, photos, out = tmp_path / "run", tmp_path / "photos", tmp_path / "ir"
    photos.mkdir()
    test_kontext.picture(32, 48, 4).save(photos / "a.png")
    assert main(["train", *TINY_MODEL, *RUNS[backbone], f"model.prompt_cache_dir={tmp_path / 'pc'}",
                 f"train.output_dir={run_dir}"]) == 0
    assert main(["generate", "--checkpoint", str(run_dir), "--input", str(photos), "--out", str(out),
                 "--steps", "2"]) == 0
    assert Image.open(out / "a.png").size == (48, 32)
