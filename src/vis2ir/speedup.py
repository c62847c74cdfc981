"""Faster sampling: fused weights (`sample.fuse`), the modulation computed once per loop (always on), compiled
transformer blocks (`sample.compile`) and step caches (`sample.cache`).

- `fuse_for_sampling`: a trained LoRA merged into the base weights (its two extra matmuls per layer cost 33 %
  of an eager step on an H200), each attention's q/k/v projections fused into one matmul, and each MLP's
  GELU applied inside its input product (`LinearGELU`). Exact within rounding; for a pipeline, which only
  samples.
- `modulation_table`: each block's adaLN modulation, which depends on the step and not on the image, computed for
  every step of a denoising loop at once, before it. Exact within float rounding.
- `compile_blocks`: regional compilation — each of the transformer's double and single blocks gets
  `torch.compile`d on its own (the 57 blocks of FLUX share two compiled graphs), so compiling takes
  tens of seconds instead of minutes. The block's `forward` is replaced by its compiled version, so the
  step caches' hooks, registered later around it, stay outside the compiled code. Exact within float
  rounding.
- `StepCache`: diffusers' cache hooks for the denoising loop, approximate:
  `first_block` (First-Block-Cache: the first block always runs; while its residual changes by less than
  `cache_threshold` (relative mean) from the last fully computed step, the other blocks are skipped and
  their last residual is reused) and `taylorseer` (TaylorSeer, diffusers' lite variant: the whole
  transformer runs at the first `cache_warmup` steps and then every `cache_interval`-th step; at the
  other steps its output is extrapolated by a Taylor series of order `cache_order` and the blocks skipped).
  The hooks are registered for one denoising loop and removed after it, so nothing carries over from one
  image to the next. It counts the steps computed in full (`computed`, `total`).

Where they are applied, so that a reader sees every change to diffusers' forward: once per model by the
pipeline (`fuse_for_sampling`, `compile_blocks`; training compiles with `compile_blocks` too), and once per
denoising loop by `loop_patches` (the RoPE table, the modulation table, the step cache), which `sample.denoise`
enters. The exact ones are tested against diffusers' own `FluxTransformer2DModel.forward`
(tests/test_speedup_against_diffusers.py), so a diffusers release that changes that forward fails a test
instead of moving sampling away from training.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU as DiffusersGELU
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from torch import nn

from vis2ir.config import SampleConfig
from vis2ir.errors import Vis2IRError, describe
from vis2ir.quantize import BLOCK_LISTS, blocks

log = logging.getLogger(__name__)

CACHES = ("none", "first_block", "taylorseer")


FUSED_AWAY = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")  # replaced by to_qkv / to_added_qkv


def fuse_for_sampling(transformer: nn.Module) -> list[str]:
    """Merge the transformer's LoRA into its base weights and drop the LoRA layers (diffusers' `fuse_lora` +
    `unload_lora`), then fuse each attention's q/k/v projections into one linear layer (diffusers'
    `fuse_projections`, as `fuse_qkv_projections` does) and drop the separate ones, which the fused attention no
    longer reads (FLUX.1 Fill: 4.3 GiB in bf16), layer by layer so that the copies never sit twice in memory.
    In place, for sampling only: the LoRA can no longer be saved or trained. Returns what was done, for the log
    (empty when there was nothing to do). Not for a quantized base (its weights are not plain tensors): the
    caller skips it.
    """
    done = []
    if getattr(transformer, "peft_config", None):
        transformer.fuse_lora()
        transformer.unload_lora()
        done.append("LoRA merged into the base weights")
    fused = 0
    # One layer at a time: the unfused copies go before the next layer fuses. The list holds the attention modules
    # only; a list of every module would keep each dropped to_q/to_k/to_v alive until the loop ends (+4 GiB on FLUX).
    attentions = [m for m in transformer.modules()
                  if callable(getattr(m, "fuse_projections", None)) and hasattr(m, "to_q")]
    for attention in attentions:
        attention.fuse_projections()
        if not getattr(attention, "fused_projections", False):
            continue
        fused += 1
        for name in FUSED_AWAY:
            fused_name = "to_qkv" if name.startswith("to_") else "to_added_qkv"
            if name in attention._modules and hasattr(attention, fused_name):
                delattr(attention, name)
    if fused:
        done.append(f"q/k/v projections fused in {fused} attention layers")
    gelus = fuse_gelu(transformer)
    if gelus:
        done.append(f"GELU applied inside {gelus} MLP input products")
    return done


class LinearGELU(nn.Module):
    """`gelu(linear(x))` with the tanh approximation (FLUX's MLPs), as one product on CUDA.

    On CUDA, `torch._addmm_activation(..., use_gelu=True)` runs cuBLASLt's GELU epilogue: the activation is
    applied to the float32 accumulator before rounding, instead of in a second pass over the `[tokens, 4·dim]`
    output (on one H200, 3072 → 12288 over 2560 tokens in bf16: 260 µs against 289 µs for the product and then
    the GELU; 0.984× a compiled 28-step FLUX Fill image, docs/performance.md). cuBLASLt's GELU is the tanh
    approximation (measured there: within 6e-6 of `F.gelu(approximate="tanh")` in float32). Elsewhere — on the
    CPU, where `_addmm_activation` computes the exact erf GELU, or when x and the weights differ in dtype (under
    autocast) — it computes `F.gelu(F.linear(x, w, b), approximate="tanh")`.

    x `[..., in_features]` → `[..., out_features]`; shares the weight and bias of the linear layer it replaces.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype == self.bias.dtype:
            y = torch._addmm_activation(self.bias, x.reshape(-1, self.in_features), self.weight.t(), use_gelu=True)
            return y.view(*x.shape[:-1], self.out_features)
        return F.gelu(F.linear(x, self.weight, self.bias), approximate="tanh")


def _plain_linear_with_bias(module) -> bool:
    """Not a LoRA layer, nor a quantized one (bitsandbytes' `Linear4bit`, `quantize.Float8Linear`): exactly
    `nn.Linear`."""
    return type(module) is nn.Linear and module.bias is not None and type(module.weight) is nn.Parameter


def fuse_gelu(transformer: nn.Module) -> int:
    """Replace each linear layer followed by a tanh GELU with one `LinearGELU`, in place; returns how many. Two
    forms in diffusers' FLUX: the MLP's `GELU(approximate="tanh")` module (the double blocks' `ff.net[0]`,
    `ff_context.net[0]`), and the single blocks' `proj_mlp` followed by `act_mlp`, whose forward is
    `act_mlp(proj_mlp(x))` (then `act_mlp` becomes the identity). Layers with a LoRA or quantized weights are
    left alone."""
    count = 0
    for module in list(transformer.modules()):
        for name, child in list(module.named_children()):
            if (isinstance(child, DiffusersGELU) and child.approximate == "tanh"
                    and _plain_linear_with_bias(child.proj)):
                setattr(module, name, LinearGELU(child.proj))
                count += 1
        act = getattr(module, "act_mlp", None)
        if (isinstance(act, nn.GELU) and act.approximate == "tanh"
                and _plain_linear_with_bias(getattr(module, "proj_mlp", None))):
            module.proj_mlp, module.act_mlp = LinearGELU(module.proj_mlp), nn.Identity()
            count += 1
    return count


class StepRow(nn.Module):
    """Stands in for one adaLN modulation layer during a denoising loop: returns `row` (`[B, out]`), which the loop
    fills with the current step's output of the layer, whatever its input (the step's silu(temb)). `row` is a
    plain attribute, not a buffer, so that compiled blocks see an ordinary input: neither the number of steps
    nor a new batch size multiplies their graphs."""

    def __init__(self, row: torch.Tensor, original: nn.Module):
        super().__init__()
        self.row = row
        object.__setattr__(self, "original", original)  # the layer it stands in for (not a submodule)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.row


def modulation_layers(transformer: nn.Module) -> list[nn.Module]:
    """The adaLN layers whose modulation is `linear(silu(temb))` of the transformer's temb: FLUX's `norm1`,
    `norm1_context` (double blocks), `norm` (single blocks) and `norm_out` (diffusers' `AdaLayerNormZero`,
    `AdaLayerNormZeroSingle`, `AdaLayerNormContinuous`). An `AdaLayerNormZero` with its own embedding (`emb`,
    e.g. class labels) computes what it modulates with from other inputs, so it is left out."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle

    kinds = (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous)
    return [m for m in transformer.modules() if isinstance(m, kinds) and getattr(m, "emb", None) is None]


def _plain_on(module: nn.Module, device: torch.device) -> bool:
    """Every weight of `module` is an ordinary tensor on `device` (not offloaded to the CPU, not an FSDP2 shard)."""
    if any(p.device != device for p in module.parameters()):
        return False
    if not torch.distributed.is_available():
        return True
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) for p in module.parameters())


def _no_op(step: int) -> None:
    """The step selector when there is no table: the layers compute their modulation themselves."""


@contextmanager
def per_step_modulation(*args, **kwargs):
    """`modulation_table` turned off (same arguments): the layers run at every step, as diffusers runs them.
    For comparisons (`scripts/bench_generate.py`, tests)."""
    yield _no_op


@contextmanager
def modulation_table(transformer: nn.Module, timesteps: torch.Tensor, guidance: torch.Tensor | None,
                     pooled: torch.Tensor):
    """Within the block, each adaLN modulation layer of `transformer` (`modulation_layers`) returns its output
    for the current step from a table computed on entry for every step at once; yields `at(i)`, which selects
    step i (device copies, no host–device synchronisation). Stands aside (`at` does nothing, the layers run as
    usual) when the weights are offloaded or FSDP2-sharded, or for a transformer without FLUX.1's
    `time_text_embed` (FLUX.2: three shared modulation layers, computed once a step already; `pooled` None).
    Nested (a loop run inside another's, e.g. by a callback): the inner loop has its own
    table, and the outer one's is back in place after it.

    Why: temb — `time_text_embed(t·1000, guidance·1000, pooled)`, as `FluxTransformer2DModel.forward` computes
    it, with t and guidance in the dtype of the hidden states (autocast's, under autocast) — depends on the
    step, not on the image, and each of FLUX.1's 77 modulation layers (3.2 B parameters) turns it into
    `linear(silu(temb))`: a one-row product that read its weights (6.5 GB for all 77 in bf16) again at every
    step, 3 % of a compiled 512×1024 step on an H200. Here each layer runs once per loop, on all steps' rows.
    Exact within float rounding (one product of `steps·B` rows instead of `steps` products of B rows).
    Memory: the table, `steps · B` rows of every layer's output (FLUX.1 in bf16: 2.1 MB per step and image).

    `timesteps`: `[steps]` flow times in [0, 1], as the loop passes them; `guidance`: `[B]` float32 or None;
    `pooled`: `[B, P]` pooled prompt embeddings (None for FLUX.2).
    """
    layers = modulation_layers(transformer)
    embed = getattr(transformer, "time_text_embed", None)
    if not layers or embed is None or pooled is None:  # FLUX.2: shared modulation layers, no pooled embedding
        yield _no_op
        return
    device = pooled.device
    previous = [m.linear for m in layers]  # the layers, or an outer loop's stand-ins for them
    originals = [p.original if isinstance(p, StepRow) else p for p in previous]
    if not all(_plain_on(m, device) for m in [embed, *originals]):
        yield _no_op
        return
    steps, b = timesteps.shape[0], pooled.shape[0]
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else pooled.dtype  # the hidden states' dtype
    t = timesteps.to(device, dtype).repeat_interleave(b) * 1000  # step-major rows: step s, image j → s·b + j
    with torch.no_grad():
        if guidance is None:
            temb = embed(t, pooled.repeat(steps, 1))
        else:
            temb = embed(t, guidance.to(dtype).repeat(steps) * 1000, pooled.repeat(steps, 1))
        # `.to(dtype)`: AdaLayerNormContinuous casts silu(temb) to the hidden states' dtype (a no-op for the others)
        tables = [linear(m.silu(temb).to(dtype)).view(steps, b, -1) for m, linear in zip(layers, originals)]
        rows = [table[0].clone() for table in tables]

    def at(step: int) -> None:
        torch._foreach_copy_(rows, [table[step] for table in tables])

    try:
        for m, row, linear in zip(layers, rows, originals):
            m.linear = StepRow(row, linear)
        yield at
    finally:
        for m, linear in zip(layers, previous):
            m.linear = linear


def compile_blocks(transformer: nn.Module, mode: str = "default", setting: str = "sample.compile") -> int:
    """`torch.compile` each block of `transformer` (in place, once); returns the number of blocks compiled.

    One path for `sample.compile` and `train.compile` (`setting` names which, in messages). Raises
    `Vis2IRError` when the transformer has no block lists (`transformer_blocks`, `single_transformer_blocks`).
    """
    found = blocks(transformer)
    if not found:
        raise Vis2IRError(f"{setting}: the transformer ({type(transformer).__name__}) has none of the block lists "
                          f"{', '.join(BLOCK_LISTS)}; set {setting}=false")
    if getattr(transformer, "_vis2ir_compiled", None) is not None:
        return 0
    for block in found:
        block._vis2ir_eager_forward = block.forward  # kept: `blocks.measure_blocks` measures the eager forward
        block.forward = torch.compile(block.forward, mode=None if mode == "default" else mode)
    transformer._vis2ir_compiled = mode
    log.info("%s: %d transformer blocks compiled with torch.compile (mode %s); the first call compiles them "
             "(slow), later ones run compiled", setting, len(found), mode)
    return len(found)


def compile_failure(err: BaseException, setting: str) -> Vis2IRError | None:
    """One line for an error `torch.compile` raised while compiling the blocks (no C++ compiler on the CPU, no
    triton on a GPU, an unsupported operation), naming `setting` and how to turn it off; None for other errors."""
    if not (type(err).__module__ or "").startswith(("torch._dynamo", "torch._inductor")):
        return None
    return Vis2IRError(f"{setting}: torch.compile could not compile the transformer's blocks ({describe(err)}); "
                       f"set {setting}=false")


class StepCache:
    """One `sample.cache` setting (not `none`), applied to a transformer for one denoising loop at a time.

        cache = StepCache.of(cfg.sample)          # None when sample.cache is none
        with cache.active(transformer):
            for each step: v = transformer(...); cache.record()

    `computed` / `total`: steps computed in full / steps run, over every loop so far; `computed_at[i]`: the
    loops that computed step i in full.
    """

    def __init__(self, settings: SampleConfig):
        if settings.cache not in CACHES[1:]:
            raise Vis2IRError(f"sample.cache: {settings.cache!r} is not one of {', '.join(CACHES)}")
        self.settings = dataclasses.replace(settings)  # a copy: the counts belong to these settings
        self.kind = settings.cache
        self.computed = 0
        self.total = 0
        self.computed_at: list[int] = []  # per step index: the loops that computed it in full
        self._probe = None
        self._step = 0

    @classmethod
    def of(cls, settings: SampleConfig) -> StepCache | None:
        """The cache `settings.cache` names, or None for `none` (the exact sampler)."""
        return None if settings.cache == "none" else cls(settings)

    @property
    def skip_rate(self) -> float | None:
        """Fraction of the steps run whose blocks were skipped (None before any step)."""
        return None if not self.total else 1 - self.computed / self.total

    def _config(self):
        """The diffusers cache config for the setting; a one-line error when this diffusers lacks it."""
        import diffusers
        import diffusers.hooks

        name = "FirstBlockCacheConfig" if self.kind == "first_block" else "TaylorSeerCacheConfig"
        config_class = getattr(diffusers.hooks, name, None)
        if config_class is None:
            raise Vis2IRError(f"sample.cache={self.kind} needs diffusers' {name}, which diffusers "
                              f"{diffusers.__version__} does not have; upgrade diffusers or set sample.cache=none")
        s = self.settings
        if self.kind == "first_block":
            return config_class(threshold=s.cache_threshold)
        return config_class(cache_interval=s.cache_interval, disable_cache_before_step=s.cache_warmup,
                            max_order=s.cache_order, taylor_factors_dtype=torch.float32, use_lite_mode=True)

    def _check(self, transformer: nn.Module) -> None:
        """The hooks need a diffusers transformer (`enable_cache`) with its blocks in the usual lists."""
        have = blocks(transformer)
        if not hasattr(transformer, "enable_cache") or len(have) < 2:
            raise Vis2IRError(f"sample.cache={self.kind} needs a diffusers transformer with `enable_cache` and at "
                              f"least 2 blocks in {' / '.join(BLOCK_LISTS)}; this model's is "
                              f"{type(transformer).__name__} with {len(have)}: set sample.cache=none")

    @contextmanager
    def active(self, transformer: nn.Module):
        """Register the cache's hooks on `transformer` for one denoising loop (fresh state), remove them after."""
        self._check(transformer)
        config = self._config()
        try:
            transformer.enable_cache(config)
        except Exception as err:  # noqa: BLE001 - e.g. a block class the hooks do not know
            raise Vis2IRError(f"sample.cache={self.kind}: diffusers could not apply it to "
                              f"{type(transformer).__name__} ({describe(err)}); set sample.cache=none") from None
        self._probe, self._step = self._make_probe(transformer), 0
        try:
            with transformer.cache_context("vis2ir"):
                yield self
        finally:
            self._probe = None
            transformer.disable_cache()

    def _make_probe(self, transformer: nn.Module):
        """A function telling whether the last transformer call computed its blocks (read from the hooks' state)."""
        from diffusers.hooks import HookRegistry

        if self.kind == "first_block":
            from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

            hook = HookRegistry.check_if_exists_or_initialize(blocks(transformer)[0]).get_hook(_FBC_LEADER_BLOCK_HOOK)
            return lambda: hook.state_manager.get_state().should_compute
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        hook = HookRegistry.check_if_exists_or_initialize(transformer.proj_out).get_hook(_TAYLORSEER_CACHE_HOOK)

        def computed() -> bool:
            state = hook.state_manager.get_state()
            return state.last_update_step == state.current_step
        return computed

    def record(self) -> None:
        """Count the step just run (inside `active`): computed in full, or skipped."""
        computed = bool(self._probe())
        if self._step == len(self.computed_at):
            self.computed_at.append(0)
        self.computed_at[self._step] += computed
        self.total += 1
        self.computed += computed
        self._step += 1

    def summary(self) -> str:
        return (f"sample.cache={self.kind}: {self.computed} of {self.total} steps computed in full "
                f"({100 * (self.skip_rate or 0):.0f} % skipped)")


@contextmanager
def computed_once(module: torch.nn.Module):
    """Within the block, `module` computes its output on the first call and returns that output on every
    later call. For the transformer's RoPE table (`pos_embed`): its ids are the same at every sampling step."""
    had_own = "forward" in vars(module)  # e.g. an offload hook's forward
    original = module.forward
    saved = []

    def forward(*args, **kwargs):
        if not saved:
            saved.append(original(*args, **kwargs))
        return saved[0]

    module.forward = forward
    try:
        yield
    finally:
        if had_own:
            module.forward = original
        else:
            del module.forward


@contextmanager
def loop_patches(transformer: nn.Module, timesteps: torch.Tensor, guidance: torch.Tensor | None,
                 pooled: torch.Tensor | None, cache: StepCache | None = None):
    """Every patch of the transformer's forward that lasts one denoising loop, in one place: the RoPE table
    computed once (`computed_once`; its ids are the same at every step; FLUX.1's `FluxPosEmbed` only: FLUX.2's
    forward calls its `pos_embed` twice a step, for the image ids and the text ids), the adaLN modulation read
    from a table (`modulation_table`, whose arguments these are), and the step cache's hooks when `cache` is
    given. Yields
    `at(i)`, to call before step i. The patches made once per model (`fuse_for_sampling`, `compile_blocks`)
    are the pipeline's. Each exact patch is checked against diffusers' own forward by
    tests/test_speedup_against_diffusers.py."""
    rope = getattr(transformer, "pos_embed", None)
    if not isinstance(rope, FluxPosEmbed):  # FLUX.2's forward calls its pos_embed twice (image, text ids)
        rope = None
    with computed_once(rope) if rope is not None else nullcontext(), \
            modulation_table(transformer, timesteps, guidance, pooled) as at_step, \
            cache.active(transformer) if cache is not None else nullcontext():
        yield at_step
