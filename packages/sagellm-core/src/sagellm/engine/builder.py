"""Building an engine: the model and KV pool of one rank, then the scheduler and runner.

:func:`build_parts` loads the model, lets the platform swap its layers, profiles memory and
creates the KV pool: the same on every rank of a multi-rank engine. :func:`assemble` adds what
only rank 0 has, the scheduler and the runner, both chosen by the :class:`Layout`, and hands
everything to ``LLMEngine`` at construction: no part is replaced afterwards.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sagellm.config import EngineConfig
from sagellm.engine.block_manager import BlockManager
from sagellm.engine.layout import Layout
from sagellm.engine.model_runner import ModelRunner, StepRunner
from sagellm.engine.plan import PrefillOp, StepPlan
from sagellm.engine.runner_context import RunnerContext
from sagellm.engine.scheduler import Scheduler
from sagellm.engine.sequence import SequenceState
from sagellm.layers.attention import freed_kv_window, unsupported_attention
from sagellm.layers.parallel import SINGLE, TPGroup
from sagellm.layers.registry import layer_overrides, swap_layers, weight_quantizations
from sagellm.loader import load_model
from sagellm.loader.loader import LoadedModel
from sagellm.models.llama import head_dim_of
from sagellm.protocols import AttentionBackend, KVBackend, KVCacheSpec, Platform
from sagellm.quant.apply import apply_quantization
from sagellm.sampling_params import SamplingParams

logger = logging.getLogger("sagellm.engine")

#: Provides the multi-rank layouts (``launch_layout``). It builds on this package, so it is
#: looked up by name, the way backends are, rather than imported here.
MULTI_RANK_LAYOUTS = "sagellm.distributed"


@dataclass
class EngineParts:
    """One rank's model, KV pool and block bookkeeping, and the facts derived from them."""

    config: EngineConfig
    platform: Platform
    loaded: LoadedModel
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    kv_spec: KVCacheSpec
    attention: AttentionBackend
    kv: KVBackend
    block_manager: BlockManager

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return self.platform.device

    def runner_context(self) -> RunnerContext:
        return RunnerContext(model=self.model, kv=self.kv, attention=self.attention,
                             platform=self.platform, config=self.config,
                             block_size=self.config.block_size, max_model_len=self.max_model_len)

    def make_model_runner(self) -> ModelRunner:
        """The platform's runner (``Platform.make_model_runner``), else core's."""
        return platform_runner(self.platform, self.runner_context())


def platform_runner(platform: Platform, ctx: RunnerContext) -> ModelRunner:
    """``platform.make_model_runner(ctx)``, checked, or core's :class:`ModelRunner`."""
    overridden = type(platform).make_model_runner is not Platform.make_model_runner
    if overridden and platform.contract_version < 2:
        warnings.warn(
            f"{type(platform).__qualname__} targets backend contract v{platform.contract_version}, "
            f"whose make_model_runner(**kwargs) is no longer called: core's runner runs instead. "
            f"Implement make_model_runner(ctx: sagellm.runner.RunnerContext) and set "
            f"contract_version = 2", DeprecationWarning, stacklevel=2)
        return ModelRunner(ctx)
    runner = platform.make_model_runner(ctx)
    if runner is None:
        return ModelRunner(ctx)
    if not isinstance(runner, ModelRunner):
        raise TypeError(f"{type(platform).__qualname__}.make_model_runner returned "
                        f"{type(runner).__qualname__}, not a sagellm.runner.ModelRunner subclass")
    return runner


def build_parts(config: EngineConfig, platform: Platform, tp: TPGroup = SINGLE) -> EngineParts:
    """Load the model for ``tp`` and size and create the KV pool (collective over ``tp``)."""
    caps = platform.capabilities()
    device = platform.device
    torch.manual_seed(config.seed)
    loaded = load_model(config, device, caps.default_dtype, tp)
    model = loaded.model
    lacking = unsupported_attention(model, caps)
    if lacking:
        raise ValueError(f"backend {platform.name!r} cannot run {loaded.source}: the model uses "
                         f"{' and '.join(lacking)}, which this backend does not support (it "
                         f"would compute full attention instead); use a backend that lists it "
                         f"in `sagellm models`, e.g. --backend cpu")
    swapped = swap_layers(model, layer_overrides(platform))
    if swapped:
        logger.debug("%s replaced %d layers", platform.name, swapped)
    apply_quantization(model, config.quantization, weight_quantizations(platform), platform.name,
                       loaded.source, loaded.hf_config)
    platform.prepare_model(model)
    hf = loaded.hf_config
    max_model_len = model_len_of(config, hf, loaded.source)
    kv_spec = KVCacheSpec(
        num_layers=int(hf.num_hidden_layers),  # type: ignore[attr-defined]
        num_kv_heads=model.layers[0].self_attn.num_kv_heads,  # type: ignore[index]
        head_dim=head_dim_of(hf),
        block_size=config.block_size,
        dtype=loaded.dtype,
    )
    attention = platform.make_attention_backend()

    def profile_context(kv: KVBackend) -> RunnerContext:
        return RunnerContext(model, kv, attention, platform, config, config.block_size,
                             max_model_len)

    # Block ids are shared by all ranks, so every pool has the smallest rank's size.
    num_blocks = tp.min_over_ranks(_num_kv_blocks(config, platform, kv_spec, max_model_len,
                                                  profile_context))
    kv = platform.make_kv_backend(kv_spec, num_blocks)
    window = freed_kv_window(model, caps)
    if window is not None:
        logger.info("every layer has a sliding window (at most %d keys): KV blocks before it "
                    "are freed as sequences move on", window)
    return EngineParts(
        config=config, platform=platform, loaded=loaded, max_model_len=max_model_len,
        vocab_size=int(hf.vocab_size),  # type: ignore[attr-defined]
        eos_token_ids=_eos_ids(loaded), kv_spec=kv_spec, attention=attention, kv=kv,
        block_manager=BlockManager(kv, config.block_size, config.enable_prefix_caching,
                                   config.kv_eviction, kv_window=window),
    )


@dataclass
class EngineAssembly:
    """Everything ``LLMEngine`` is made of, built by :func:`assemble`."""

    parts: EngineParts
    layout: Layout
    scheduler: Scheduler
    runner: StepRunner


def assemble(config: EngineConfig, platform: Platform, layout: Layout | None = None
             ) -> EngineAssembly:
    """Rank 0 of an engine: its layout (starting the other ranks), parts, scheduler and runner.

    ``layout=None`` picks one from ``config``: one rank, or the tensor-parallel or
    disaggregated layout of ``sagellm.distributed``.
    """
    platform.set_device()
    # Before the workers start, so every rank sees the prefill budget this engine uses; a
    # layout passed in gets the backend's default chunk too (a no-op where its config set one).
    chunk = platform.capabilities().prefill_chunk_tokens
    layout = layout or layout_for(config.with_prefill_budget(chunk), platform)
    parts = build_parts(layout.config.with_prefill_budget(chunk), platform, layout.tp)
    scheduler = layout.make_scheduler(parts)
    return EngineAssembly(parts, layout, scheduler, layout.make_runner(parts, scheduler))


def layout_for(config: EngineConfig, platform: Platform) -> Layout:
    """One rank, unless ``config`` asks for tensor parallelism or disaggregation."""
    if config.tensor_parallel_size == 1 and not config.disaggregate_prefill:
        return Layout(config)
    provider = importlib.import_module(MULTI_RANK_LAYOUTS)
    layout: Layout = provider.launch_layout(config, platform)
    return layout


# -- start-up helpers ----------------------------------------------------------------------


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    eos = getattr(loaded.hf_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(eos)
    tok = loaded.tokenizer
    if tok is not None and getattr(tok, "eos_token_id", None) is not None:
        ids.add(tok.eos_token_id)  # type: ignore[union-attr]
    return frozenset(ids)


def _num_kv_blocks(cfg: EngineConfig, platform: Platform, spec: KVCacheSpec, max_model_len: int,
                   profile_context: Callable[[KVBackend], RunnerContext]) -> int:
    per_block = spec.bytes_per_block
    useful = -(-max_model_len // cfg.block_size) * cfg.max_num_seqs
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    if platform.device.type == "cpu":
        return max(1, min(cfg.cpu_kv_cache_bytes // per_block, useful))
    activation = _profile_activation_bytes(platform, spec, cfg.max_num_batched_tokens,
                                           max_model_len, profile_context)
    mem = platform.memory_info()
    used = mem.total_bytes - mem.free_bytes
    budget = int(mem.total_bytes * cfg.gpu_memory_utilization) - used - activation
    if budget < per_block:
        raise RuntimeError(
            f"no device memory left for the KV cache: {mem.total_bytes / 2**30:.1f} GiB total, "
            f"{used / 2**30:.1f} GiB in use, {activation / 2**30:.1f} GiB of activations; raise "
            f"gpu_memory_utilization ({cfg.gpu_memory_utilization}) or lower max_num_batched_tokens")
    return int(budget // per_block)


def profile_prompt_lengths(num_tokens: int, max_model_len: int) -> list[int]:
    """The prompts of the memory profile's step: ``num_tokens`` tokens (the step budget) in
    prompts of at most ``max_model_len`` each, as a step of several prompts can hold them all."""
    if num_tokens <= 0 or max_model_len <= 0:
        raise ValueError(f"the profile needs tokens and a context, got {num_tokens} and "
                         f"{max_model_len}")
    full, rest = divmod(num_tokens, max_model_len)
    return [max_model_len] * full + ([rest] if rest else [])


@torch.inference_mode()
def _profile_activation_bytes(platform: Platform, spec: KVCacheSpec, n: int, max_model_len: int,
                              profile_context: Callable[[KVBackend], RunnerContext]) -> int:
    """Peak activation memory of the largest step (``n`` tokens, the step budget), measured
    with a dummy prefill over a pool just large enough for it.

    A step holds up to ``n`` tokens whatever the context length, in several prompts when ``n``
    is larger than ``max_model_len`` (sixteen 512-token prompts fill an 8192-token budget under
    a 4096 context): the profile prefills ``n`` tokens in prompts of at most ``max_model_len``
    (:func:`profile_prompt_lengths`), so that no position passes the context."""
    bs = spec.block_size
    lengths = profile_prompt_lengths(n, max_model_len)
    blocks = [-(-m // bs) for m in lengths]
    tmp_kv = platform.make_kv_backend(spec, sum(blocks))
    prefills = []
    first = 0
    for i, (m, b) in enumerate(zip(lengths, blocks)):
        seq = SequenceState(f"profile-{i}", [0] * m, SamplingParams(max_tokens=1))
        seq.block_table = list(range(first, first + b))
        first += b
        prefills.append(PrefillOp(seq, 0, m))
    runner = ModelRunner(profile_context(tmp_kv))
    platform.synchronize()
    platform.reset_peak_memory()
    base = platform.max_memory_allocated()
    plan = StepPlan(step_id=0, prefills=prefills)
    inp = runner.prepare(plan)
    hidden = runner.forward(inp)
    runner.model.compute_logits(hidden)  # type: ignore[operator]
    platform.synchronize()
    peak = platform.max_memory_allocated() - base
    del tmp_kv, runner, inp, hidden
    platform.empty_cache()
    return max(peak, 0)


def model_len_of(config: EngineConfig, hf, source: str) -> int:  # type: ignore[no-untyped-def]
    """The longest sequence the engine admits: ``max_model_len`` if set, else the model's
    ``max_position_embeddings``. A longer setting is refused here, at start-up: the rotary
    tables end at ``max_position_embeddings``, so a position past it would index outside them
    in the middle of serving (a device-side assert on CUDA, which ends the process)."""
    limit = int(hf.max_position_embeddings)
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len={config.max_model_len} is longer than {source} supports "
                         f"(max_position_embeddings={limit}); use --max-model-len {limit} or less")
    return config.max_model_len
