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
    ("model.codec=pixel", "model.codec: expected 'vae' with pretrained weights"),
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
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: not valid YAML: expected ',' or ']'"):  # FILE:LINE:COL
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_in_one_line(capsys):
    assert main(["demo", "model.semantic.num_head=16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vis2ir: error: unknown setting 'model.semantic.num_head'")
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("override, key", [
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("train.learning_rate=-1e-4", "train.learning_rate"),
    ("train.learning_rate=nan", "train.learning_rate"),
    ("train.learning_rate=.inf", "train.learning_rate"),
    ("train.adapter_learning_rate=inf", "train.adapter_learning_rate"),
    ("train.adapter_learning_rate=0", "train.adapter_learning_rate"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.adapter_weight_decay=-1", "train.adapter_weight_decay"),
    ("train.grad_clip=-0.5", "train.grad_clip"),
    ("train.guidance=.nan", "train.guidance"),
    ("train.guidance=-1", "train.guidance"),
    ("train.timestep_mean=nan", "train.timestep_mean"),
    ("train.timestep_std=0", "train.timestep_std"),
    ("train.timestep_shift=-2", "train.timestep_shift"),
    ("train.offset_noise=-0.1", "train.offset_noise"),
    ("train.max_minutes=0", "train.max_minutes"),
    ("train.max_minutes=nan", "train.max_minutes"),
    ("train.max_steps=-1", "train.max_steps"),
    ("train.accumulate_grad_batches=0", "train.accumulate_grad_batches"),
    ("train.seed=-1", "train.seed"),
    ("train.num_nodes=0", "train.num_nodes"),
    ("train.devices=0", "train.devices"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.keep_last=0", "train.keep_last"),
    ("train.val_every=0", "train.val_every"),
    ("train.val_batches=-1", "train.val_batches"),
    ("train.log_every=0", "train.log_every"),
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("train.strategy=deepspeed", "train.strategy"),
    ("model.semantic.num_heads=0", "model.semantic.num_heads"),
    ("model.semantic.num_heads=7", "model.semantic.num_heads"),    # 3072 = 128 × 24 is not a multiple of 7
    ("model.semantic.num_heads=512", "model.semantic.num_heads"),  # head dim 6: RoPE needs a multiple of 4
    ("model.semantic.num_layers=0", "model.semantic.num_layers"),
    ("model.semantic.dropout=1", "model.semantic.dropout"),
    ("model.semantic.fusion_alpha=nan", "model.semantic.fusion_alpha"),
    ("model.semantic.scale_init=inf", "model.semantic.scale_init"),
    ("model.semantic.rope_min_wavelength=0", "model.semantic.rope_min_wavelength"),
    ("model.semantic.rope_max_wavelength=.inf", "model.semantic.rope_max_wavelength"),
    ("model.semantic.rope_max_wavelength=1", "model.semantic.rope_min_wavelength"),
    ("model.lora.rank=0", "model.lora.rank"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=-0.1", "model.lora.dropout"),
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.transformer.num_attention_heads=0", "model.transformer.num_attention_heads"),
    ("model.transformer.num_layers=-1", "model.transformer.num_layers"),
    ("model.transformer.joint_attention_dim=0", "model.transformer.joint_attention_dim"),
    ("model.transformer.pooled_projection_dim=0", "model.transformer.pooled_projection_dim"),
    ("model.transformer.axes_dims_rope=[15,57,56]", "model.transformer.axes_dims_rope"),
    ("model.vae.norm_num_groups=0", "model.vae.norm_num_groups"),
    ("model.vae.block_out_channels=[16,16,16,12]", "model.vae.block_out_channels"),
    ("model.vae.latent_channels=0", "model.vae.latent_channels"),
    ("model.vae.layers_per_block=0", "model.vae.layers_per_block"),
    ("model.text.num_layers=0", "model.text.num_layers"),
    ("model.text.seed=-3", "model.text.seed"),
    ("model.seed=-1", "model.seed"),
    ("model.pixel_factor=0", "model.pixel_factor"),
    ("model.max_sequence_length=0", "model.max_sequence_length"),
    ("data.size=0", "data.size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("data.ir_percentiles=[1, nan]", "data.ir_percentiles"),
    ("data.ir_percentiles=[99, 1]", "data.ir_percentiles"),
    ("data.ir_range=[0, .inf]", "data.ir_range"),
    ("data.val_fraction=1", "data.val_fraction"),
    ("data.test_fraction=-0.1", "data.test_fraction"),
    ("data.synth_count=0", "data.synth_count"),
    ("data.synth_seed=-1", "data.synth_seed"),
    ("sample.steps=0", "sample.steps"),
    ("sample.guidance=nan", "sample.guidance"),
    ("sample.guidance=-1", "sample.guidance"),
    ("sample.seed=-1", "sample.seed"),
    ("sample.adapter_scale=-inf", "sample.adapter_scale"),
    ("eval.hot_percentile=100", "eval.hot_percentile"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.limit=0", "eval.limit"),
    ("eval.fit_limit=0", "eval.fit_limit"),
    ("eval.noise_draws=0", "eval.noise_draws"),
    # every seed below 2**32 (Lightning's and numpy's seeding; torch's overflow at 2**63 was a traceback)
    ("train.seed=4294967296", "train.seed"),
    ("model.seed=1180591620717411303424", "model.seed"),
    ("model.text.seed=4294967296", "model.text.seed"),
    ("data.synth_seed=4294967296", "data.synth_seed"),
    ("sample.seed=1180591620717411303424", "sample.seed"),
])
def test_settings_that_cannot_work_are_refused(override, key):
    """Every numeric setting has its range; NaN and inf (YAML `.nan`, override `nan`) are never taken."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"{key}: expected ") and "\n" not in message


def test_nan_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: .nan\n")
    with pytest.raises(ConfigError, match=r"^train.learning_rate: expected a finite number, got nan$"):
        load_config(path)
    path.write_text("train:\n  warmup_steps: -10\n")
    with pytest.raises(ConfigError, match=r"^train.warmup_steps: expected an integer >= 0, got -10$"):
        load_config(path)


@pytest.mark.parametrize("overrides, message", [
    (["train.strategy=deepspeed"], r"^train.strategy: expected 'auto', 'ddp' or 'fsdp' \(DeepSpeed is not supported: "
                                   r"train.strategy=fsdp shards the frozen base .*\), got 'deepspeed'$"),
    (["train.strategy=fsdp", "model.quantize=nf4"], r"^model.quantize: expected none with train.strategy=fsdp "
                                                    r"\(a quantized base cannot be sharded: .*\), got 'nf4'$"),
    (["model.quantize=fp8", "train.strategy=fsdp"], r"^model.quantize: expected none with train.strategy=fsdp"),
    (["train.strategy=fsdp", "train.precision=16-mixed"], r"^train.precision: expected .* with train.strategy=fsdp"),
    (["train.strategy=fsdp", "train.precision=bf16-true"],
     r"^train.precision: expected 'auto' or 'bf16-mixed' with train.strategy=fsdp .*, got 'bf16-true'$"),
    (["train.strategy=fsdp", "train.compile=true"], r"^train.compile: expected false with train.strategy=fsdp"),
    (["train.memory_budget_gib=20"], r"^train.memory_budget_gib: expected null unless train.gradient_checkpointing is auto"),
    (["train.gradient_checkpointing=sometimes"],
     r"^train.gradient_checkpointing: expected true or false or one of 'auto', got 'sometimes'$"),
])
def test_strategies_that_cannot_work_are_refused_in_one_line(overrides, message):
    """FSDP trains (tests/test_train.py); DeepSpeed, FSDP over a quantized base and FSDP with fp16 loss scaling
    are refused in one line saying what to use instead."""
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)
    assert load_config(None, ["train.strategy=fsdp"]).train.strategy == "fsdp"




def test_the_seed_bound_is_the_last_seed_and_noise_draws_stay_under_it():
    """2**32 - 1 is a seed; the noise draws' seeds (sample.seed, +1, ...) must stay under the bound too."""
    assert load_config(None, ["train.seed=4294967295", "sample.seed=4294967295"]).train.seed == 2**32 - 1
    with pytest.raises(ConfigError, match=r"^eval.noise_draws: expected at most 4294967296 - sample.seed"):
        load_config(None, ["sample.seed=4294967295", "eval.noise_draws=2"])


def test_old_backbone_key_moves_to_weights(tmp_path, caplog):
    """`model.backbone: random | pretrained` (where the weights came from, before it named the base model) in
    a file is read as `model.weights` with a warning; the shipped checkpoints' config.yaml use the new keys, so the
    demo warns about nothing."""
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  backbone: random\n  codec: pixel\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(old)
    assert (cfg.model.weights, cfg.model.backbone, cfg.model.codec) == ("random", "flux1-fill", "pixel")
    assert "model.backbone=random is now model.weights=random" in caplog.text
    caplog.clear()
    for name in ("demo", "demo_cross_attention"):
        shipped = Path(__file__).resolve().parents[1] / "src" / "vis2ir" / "assets" / name / "config.yaml"
        with caplog.at_level("WARNING"):
            assert load_config(shipped).model.weights == "random"
    assert "is now" not in caplog.text


@pytest.mark.parametrize("override, message", [
    ("model.backbone=random", "override model.backbone=random: that setting is now model.weights=random"),
    ("model.backbone=pretrained", "that setting is now model.weights=pretrained"),
    ("model.backbone=flux2-klein",
     "model.semantic.mode: expected none, pixel_fusion or channel_concat with model.backbone=flux2-klein"),
    ("model.backbone=flux3", "model.backbone: 'flux3' is not allowed"),
])
def test_backbone_values_refused_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.weights=random", override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_old_backbone_key_in_a_latent_cache_record():
    """A latent cache made before the rename recorded `model.backbone: random`: read as weights, on Fill."""
    from vis2ir.config.migrate import move_renamed_flat

    old = {"model.backbone": "random", "model.codec": "vae"}
    assert move_renamed_flat(old) == {"model.backbone": "flux1-fill", "model.weights": "random", "model.codec": "vae"}
    new = {"model.backbone": "flux1-kontext", "model.weights": "random"}
    assert move_renamed_flat(new) == new
