"""train.strategy=fsdp's pieces in one process (a gloo group of one); two processes: tests/test_train.py."""

import pytest
import torch
import torch.distributed as dist

from vis2ir.model import build_model
from vis2ir.sharding import _named, _positional, is_sharded, shard_model, total_norm, trainable_state
from vis2ir.train import prepare_for_training


@pytest.fixture
def group_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_shard_model_wraps_each_block_keeps_dtypes_and_gathers_the_trainable_state(tiny_config, group_of_one):
    """One FSDP unit per double/single block and the transformer; bf16 base and fp32 LoRA side by side; the
    adapter whole; `trainable_state` gives back exactly the trainable tensors, whole."""
    from torch.distributed.tensor import DTensor

    cfg = tiny_config("model.codec=pixel", "model.semantic.mode=cross_attention", "model.lora.rank=4",
                      "model.dtype=bfloat16")
    model = prepare_for_training(build_model(cfg), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert not is_sharded(model) and trainable_state(model).keys() == before.keys()
    shard_model(model, group_of_one)
    units = {n for n, m in model.named_modules() if type(m).__name__.startswith("FSDP")}
    assert units == {"transformer", "transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"}
    assert is_sharded(model) and not is_sharded(model.adapter)
    dtypes = {n: p.dtype for n, p in model.transformer.named_parameters()}
    assert all(isinstance(p, DTensor) for p in model.transformer.parameters())
    assert {dtypes[n] for n in dtypes if "lora_" in n} == {torch.float32}
    assert {dtypes[n] for n in dtypes if "lora_" not in n} == {torch.bfloat16}
    state = trainable_state(model)
    assert state.keys() == before.keys()
    assert all(type(v) is torch.Tensor and torch.equal(v, before[k]) for k, v in state.items())


def test_total_norm_counts_sharded_and_whole_tensors_once(group_of_one):
    from torch.distributed.tensor import Shard, distribute_tensor

    a, b = torch.randn(6, 4), torch.randn(5)
    sharded = distribute_tensor(a, group_of_one, [Shard(0)])
    expected = torch.linalg.vector_norm(torch.cat([a.flatten(), b]))
    assert torch.allclose(total_norm([sharded, b]), expected) and torch.allclose(total_norm([b]), b.norm())


def test_optimizer_state_by_position_round_trips():
    """The resume state keeps the optimizer's own layout (keys by position over its groups), as DDP writes it."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    optimizer = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 0.1}])
    sum(p.sum() for p in params).backward()
    optimizer.step()
    plain = optimizer.state_dict()
    order = ["a", "b", "c"]
    named = _named(plain, order)
    assert list(named["state"]) == order and named["param_groups"][1]["params"] == ["c"]
    assert _positional(named, order) == plain


def test_sampling_a_sharded_model_leaves_the_modulation_layers_alone(tiny_config, group_of_one):
    """The sampler's modulation table (`speedup.modulation_table`) calls the layers outside FSDP's forward, where
    their weights are shards: for a sharded model it stands aside and the layers run per step, as FSDP needs."""
    from vis2ir.speedup import modulation_layers, modulation_table

    cfg = tiny_config("model.codec=pixel", "model.semantic.mode=none")
    model = build_model(cfg)
    shard_model(model, group_of_one)
    layers = modulation_layers(model.transformer)
    before = [m.linear for m in layers]
    pooled = model.pooled_prompt_embeds
    with modulation_table(model.transformer, torch.ones(3), torch.ones(1), pooled) as at_step:
        at_step(0)
        assert [m.linear for m in layers] == before
