"""The backend contract: what a hardware package implements so that core can run on it.

Four abstractions, each small and typed:

* :class:`KVBackend`  - owns the device memory of the paged KV pool and hands out physical blocks.
* :class:`AttentionBackend` - paged prefill, paged decode and KV writes.
* :class:`CommBackend` - collectives and KV-block transfer between ranks.
* :class:`Platform` - describes a device kind, says whether it can run here, builds the three
  objects above, moves data between host and device, and may replace two things of core's:
  the model runner (``make_model_runner``, see :mod:`sagellm.runner`) and the layers declared
  swappable in :mod:`sagellm.layers.registry` (``register_layers``); it also runs the one op
  of the sampling path a device may do faster, ``logprobs``.

Core owns all bookkeeping (which sequence holds which block, reference counts, scheduling); a
backend owns memory and kernels. ``CONTRACT_VERSION`` is bumped on every incompatible change; a
plugin may declare the version it was written against with ``Platform.contract_version``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from torch import nn

    from sagellm.engine.model_runner import ModelRunner
    from sagellm.engine.runner_context import RunnerContext
    from sagellm.layers.logprobs import LogprobTensors
    from sagellm.layers.quant_linear import QuantizedWeight
    from sagellm.layers.registry import LayerKind

#: Version 2: ``make_model_runner(ctx: RunnerContext)`` (was ``**kwargs``), ``register_layers``,
#: ``fetch_ids`` / ``to_device`` / ``empty_cache``; ``KVBackend.copy_blocks`` left the contract.
CONTRACT_VERSION = 2
#: The oldest ``Platform.contract_version`` core still loads (see ``docs/backends.md`` section 4).
OLDEST_CONTRACT_VERSION = 1

#: ``register(kind, replacement)``, the callback :meth:`Platform.register_layers` receives.
LayerRegister = Callable[["LayerKind", "type[nn.Module]"], None]
#: ``register(weight_cls)``, the callback :meth:`Platform.register_quantizations` receives.
QuantizationRegister = Callable[["type[QuantizedWeight]"], None]


class KVPoolExhausted(RuntimeError):
    """Raised by :meth:`KVBackend.allocate_blocks` when fewer blocks are free than asked for."""


# --------------------------------------------------------------------------------------------
# KV cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the paged KV pool, decided by core from the model config."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes over all layers, keys and values together."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


@dataclass(frozen=True)
class KVMemoryUsage:
    """What :meth:`KVBackend.get_memory_usage` reports."""

    num_blocks: int
    num_free_blocks: int
    block_size: int
    bytes_total: int

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0


class KVBackend(abc.ABC):
    """The paged KV pool of one device.

    Created once by the engine after memory profiling (``Platform.make_kv_backend``). The pool
    holds ``num_blocks`` physical blocks per layer; block ``i`` of every layer belongs to the same
    owner. Core's ``BlockManager`` asks for physical blocks with :meth:`allocate_blocks`, keeps the
    reference counts, and returns blocks with :meth:`free_blocks` when the last reference is gone.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device

    @property
    @abc.abstractmethod
    def num_free_blocks(self) -> int:
        """Blocks not handed out. Read by the block manager before every allocation."""

    @abc.abstractmethod
    def allocate_blocks(self, num_blocks: int) -> list[int]:
        """Hand out ``num_blocks`` free physical block ids.

        Called by the block manager when a sequence grows into a new block. Raises
        :class:`KVPoolExhausted` (allocating nothing) if fewer are free.
        """

    @abc.abstractmethod
    def free_blocks(self, block_ids: Sequence[int]) -> None:
        """Take blocks back. Called by the block manager when a block's last reference drops.

        Freeing a block that is not allocated is a bug in the caller and must raise ``ValueError``.
        """

    @abc.abstractmethod
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pool tensors: per layer ``(key_cache, value_cache)``.

        Each has shape ``[num_blocks, block_size, num_kv_heads, head_dim]``. Passed by the model
        runner to the attention backend on every forward. Must return the same tensors every
        call (CUDA graphs capture their addresses).
        """

    @abc.abstractmethod
    def get_memory_usage(self) -> KVMemoryUsage:
        """Blocks in use and bytes held. Read by metrics and logs after each step."""


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


@dataclass
class PrefillMetadata:
    """The prefill part of a batch: ``num_seqs`` sequences with one or more new tokens each.

    ``cu_seqlens_q`` [num_seqs + 1] int32: offsets of each sequence's new tokens in the flat batch.
    ``seq_lens`` [num_seqs] int32: total tokens of context after this step (cached + new).
    ``context_lens`` [num_seqs] int32: tokens already in the cache before this step (cached prefix
    or earlier chunks); the new tokens sit at positions ``context_lens .. seq_lens``.
    ``block_tables`` [num_seqs, max_blocks] int32, padded with 0; entries may be
    :data:`NO_BLOCK` (see there).
    """

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    context_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    has_prefix: bool
    seq_lens_list: list[int] = field(default_factory=list)
    context_lens_list: list[int] = field(default_factory=list)


@dataclass
class DecodeMetadata:
    """The decode part of a batch: one new token per sequence.

    ``seq_lens`` [num_seqs] int32 counts the new token; ``block_tables`` [num_seqs, max_blocks]
    (entries may be :data:`NO_BLOCK`, see there).
    """

    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seq_len: int


@dataclass(frozen=True)
class AttentionLayerSpec:
    """How one attention layer departs from plain causal attention (fixed when the model is built).

    ``sliding_window``: a query at position ``p`` sees only keys at positions ``> p - window``
    (``window`` keys, itself included); ``None``: every earlier key. ``logits_soft_cap``: scores
    (after the scale) become ``cap * tanh(score / cap)`` before the mask and softmax; ``None``:
    unchanged. Core passes a spec to :meth:`AttentionBackend.prefill` and ``decode`` only when
    it is not :data:`FULL_ATTENTION`, and only to a platform whose :class:`Capabilities` says it
    supports what the spec asks for; the engine refuses the model otherwise.
    """

    sliding_window: int | None = None
    logits_soft_cap: float | None = None

    def __post_init__(self) -> None:
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be positive, got {self.logits_soft_cap!r}")

    @property
    def is_full(self) -> bool:
        return self.sliding_window is None and self.logits_soft_cap is None


#: Plain causal attention over every earlier key, scores unchanged.
FULL_ATTENTION = AttentionLayerSpec()

#: A block-table entry whose block the engine freed: every token in it lies before the sliding
#: window of every query of this step (``key <= first query position - window``). Only given to
#: a platform whose :attr:`Capabilities.skips_out_of_window_blocks` is true, for a model whose
#: every layer is windowed; its prefill and decode must read neither the entry nor any slot
#: before the window start of the sequence's first query.
NO_BLOCK = -1


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward, built by the model runner from the step plan.

    The flat batch holds the prefill tokens first, then the decode tokens. ``slot_mapping`` gives,
    for every token of the batch, its slot ``block_id * block_size + offset`` in the pool; a
    negative slot means "do not write" (padding).
    """

    num_prefill_tokens: int
    num_decode_tokens: int
    slot_mapping: torch.Tensor
    prefill: PrefillMetadata | None
    decode: DecodeMetadata | None

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


class AttentionBackend(abc.ABC):
    """Attention kernels over the paged KV pool.

    Called by every attention layer of the model in every forward, in this order: ``write_kv``
    with the new keys and values, then ``prefill`` on the prefill tokens and ``decode`` on the
    decode tokens. Shapes: queries ``[tokens, num_heads, head_dim]``, keys and values
    ``[tokens, num_kv_heads, head_dim]``; ``num_heads`` is a multiple of ``num_kv_heads`` (GQA).
    """

    name: ClassVar[str] = "attention"

    @abc.abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store new keys and values at ``slot_mapping`` (skip negative slots)."""

    @abc.abstractmethod
    def prefill(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: PrefillMetadata,
        scale: float,
        layer: AttentionLayerSpec = FULL_ATTENTION,
    ) -> torch.Tensor:
        """Causal attention of the new tokens over their cached prefix and themselves.

        ``layer`` (passed only when it is not :data:`FULL_ATTENTION`, so a backend without
        sliding-window or soft-cap support may leave it out of its signature) narrows the keys
        each query sees and caps the scores; see :class:`AttentionLayerSpec`.

        ``key``/``value`` are the new tokens' own keys and values (already written to the cache),
        so a backend may skip reading the cache when ``meta.has_prefix`` is false. Returns
        ``[tokens, num_heads, head_dim]``.
        """

    @abc.abstractmethod
    def decode(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: DecodeMetadata,
        scale: float,
        layer: AttentionLayerSpec = FULL_ATTENTION,
    ) -> torch.Tensor:
        """Attention of one new token per sequence over its cached context (all of it, or the
        last ``layer.sliding_window`` tokens); ``layer`` as in :meth:`prefill`."""


# --------------------------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------------------------


@dataclass
class BandwidthStats:
    """Bytes moved and time spent per operation kind since the backend was created."""

    bytes_by_op: dict[str, int] = field(default_factory=dict)
    seconds_by_op: dict[str, float] = field(default_factory=dict)
    calls_by_op: dict[str, int] = field(default_factory=dict)

    def record(self, op: str, nbytes: int, seconds: float) -> None:
        self.bytes_by_op[op] = self.bytes_by_op.get(op, 0) + nbytes
        self.seconds_by_op[op] = self.seconds_by_op.get(op, 0.0) + seconds
        self.calls_by_op[op] = self.calls_by_op.get(op, 0) + 1

    def gbps(self, op: str) -> float:
        """Algorithm bandwidth of ``op`` in GB/s (bytes of the payload over wall time)."""
        secs = self.seconds_by_op.get(op, 0.0)
        return self.bytes_by_op.get(op, 0) / secs / 1e9 if secs > 0 else 0.0

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            op: {
                "bytes": self.bytes_by_op[op],
                "seconds": self.seconds_by_op[op],
                "calls": self.calls_by_op[op],
                "gbps": self.gbps(op),
            }
            for op in sorted(self.bytes_by_op)
        }


class CommBackend(abc.ABC):
    """Collectives between the ranks of one engine (tensor parallel, prefill/decode workers).

    Created by ``Platform.make_comm_backend`` in every worker process once the process group
    exists. Every method is collective over the ranks it names and blocks until the data is
    usable on this rank.
    """

    rank: int
    world_size: int

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place; returns it. Called by row-parallel layers."""

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along ``dim``. Called by the vocab-parallel head."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy ``src``'s tensor to every rank, in place. Called to ship step plans and ids."""

    @abc.abstractmethod
    def send_kv_blocks(self, kv: KVBackend, block_ids: Sequence[int], dst: int) -> None:
        """Send the content of ``block_ids`` (every layer) to rank ``dst``.

        Called by a prefill worker once a sequence's prompt is in the cache. Block ids, shapes and
        dtypes travel with the data so the receiver can check them.
        """

    @abc.abstractmethod
    def recv_kv_blocks(self, kv: KVBackend, block_ids: Sequence[int], src: int) -> None:
        """Receive blocks sent by ``src`` into the local ``block_ids`` (same count, same order)."""

    @abc.abstractmethod
    def get_bandwidth_stats(self) -> BandwidthStats:
        """Bytes and time per operation since creation. Read by logs, metrics and benchmarks."""

    def barrier(self) -> None:
        """Wait for every rank. Default: an all-reduce of one element."""
        self.all_reduce(torch.zeros(1, device=self.device))

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device tensors handed to this backend live on."""


# --------------------------------------------------------------------------------------------
# Platform
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Availability:
    """Whether a platform can run here; ``reason`` says why not, in words a user can act on."""

    available: bool
    reason: str = ""

    @classmethod
    def yes(cls, detail: str = "") -> Availability:
        return cls(True, detail)

    @classmethod
    def no(cls, reason: str) -> Availability:
        return cls(False, reason)


@dataclass(frozen=True)
class Capabilities:
    dtypes: tuple[torch.dtype, ...]
    default_dtype: torch.dtype
    supports_graphs: bool = False
    dist_backend: str = "gloo"
    #: ``auto`` prefers higher priorities; the CPU backend has 0 and is the fallback.
    priority: int = 100
    #: Prefill tokens of one step when ``EngineConfig.max_prefill_tokens`` is unset, so that one
    #: long prompt is prefilled in chunks between other requests' decode steps instead of
    #: holding them up for one very long step. Read once by ``LLMEngine`` at start-up (capped
    #: by ``max_num_batched_tokens``); ``None``: the whole step budget,
    #: ``max_num_batched_tokens``. Pick it so that one chunk's step stays around a second.
    prefill_chunk_tokens: int | None = None
    #: Whether the attention backend honours :attr:`AttentionLayerSpec.sliding_window` and
    #: :attr:`AttentionLayerSpec.logits_soft_cap`. Read by the engine when it loads a model: a
    #: model with a layer that needs a feature the platform lacks is refused with a message
    #: (never run as full attention).
    supports_sliding_window: bool = False
    supports_logits_soft_cap: bool = False
    #: Whether windowed prefill and decode never read a block-table entry (nor its slots) whose
    #: tokens all lie before the window of the sequence's first query of the step. Then, for a
    #: model whose every layer is windowed, the engine frees such blocks as a sequence moves on
    #: and puts :data:`NO_BLOCK` in their entries (``BlockManager.release_out_of_window``);
    #: otherwise every block stays held until the sequence ends. Read once at start-up.
    skips_out_of_window_blocks: bool = False
    #: Whether work queued on the device runs while the host goes on (a GPU's stream), so that
    #: planning and queueing step N+1 while step N runs pays: ``EngineConfig.async_scheduling``
    #: left to ``auto`` turns asynchronous scheduling on where this is true (and the runner
    #: queues steps through ``ModelRunner.launch``). Read once at start-up.
    async_steps: bool = False
    #: Whether kernels compile the first time each shape class runs (Triton's JIT), so that the
    #: first requests would wait for them: ``EngineConfig.warmup`` left to ``auto`` then runs
    #: the start-up warm-up (``sagellm.engine.warmup``). Read once at start-up.
    compiles_on_first_use: bool = False


@dataclass(frozen=True)
class MemoryInfo:
    free_bytes: int
    total_bytes: int


class DeviceEvent(Protocol):
    """A point in a device's queue of work (``Platform.record_event``)."""

    def synchronize(self) -> None:
        """Return once the device has done the work queued before the event."""
        ...


#: Words in an exception's message that mean the device, not one request, is broken.
FATAL_ERROR_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "NCCL error",
)


class Platform(abc.ABC):
    """One kind of device, as a plugin hands it to core (``sagellm_register_backends``).

    Core instantiates the class once per engine with the device index; everything else is built
    through the factories below.
    """

    #: The name users select with ``backend=NAME``.
    name: ClassVar[str]
    #: The ``torch.device`` type string (``cpu``, ``cuda``, ``npu``, ``mlu``).
    device_type: ClassVar[str]
    #: The contract version this platform was written against.
    contract_version: ClassVar[int] = CONTRACT_VERSION

    def __init__(self, device_index: int = 0) -> None:
        self.device_index = device_index

    @classmethod
    @abc.abstractmethod
    def is_available(cls) -> Availability:
        """Can this platform run here? Must never raise: catch and explain instead.

        Called by discovery (``sagellm backends``, server start-up) and by ``auto`` selection.
        """

    @classmethod
    @abc.abstractmethod
    def capabilities(cls) -> Capabilities:
        """Dtypes, graph support, distributed backend and ``auto`` priority."""

    @property
    def device(self) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, self.device_index)

    def set_device(self) -> None:
        """Make this platform's device current for the process. Called once by each worker."""

    @abc.abstractmethod
    def memory_info(self) -> MemoryInfo:
        """Free and total bytes of the device, read by the engine to size the KV pool."""

    def synchronize(self) -> None:
        """Wait for queued device work; used around timings and memory profiling, and passed to
        :class:`~sagellm.backends.torch_comm.TorchDistributedComm` for exact transfer timings."""

    def empty_cache(self) -> None:
        """Return the allocator's cached free memory to the device.

        Called once by the engine after memory profiling, before the KV pool is sized, so the
        profile's temporaries do not count as used memory. Default: nothing.
        """

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """Copy a freshly built host tensor of step inputs to the device without waiting.

        Called by the model runner for every input tensor of every step. Default:
        ``host.to(self.device, non_blocking=True)``; a device whose copies only overlap from
        page-locked memory pins ``host`` first.
        """
        return host.to(self.device, non_blocking=True)

    def fetch_ids(self, ids: torch.Tensor) -> list[int]:
        """The sampled token ids ``ids`` (a small device tensor) as a Python list.

        Called by the model runner once per step; it is the step's only wait for the device. A
        device whose ``tensor.tolist()`` waits while holding the interpreter lock should wait
        with it released (other threads, such as the server's event loop, run meanwhile).
        Default: ``ids.cpu().tolist()``.
        """
        return ids.cpu().tolist()  # type: ignore[no-any-return]

    def start_fetch(self, ids: torch.Tensor) -> Callable[[], list[int]]:
        """:meth:`fetch_ids` in two halves: queue the copy of ``ids`` to the host now, without
        waiting, and return the wait, which gives the list once the copy is done.

        With asynchronous scheduling the model runner starts the copy of step N's ids, queues
        step N+1 behind it and only then waits; a device that copies asynchronously should
        copy into page-locked memory here behind an event, and wait (with the interpreter lock
        released) in the returned call. ``ids`` may be a view of a buffer that work queued
        later overwrites (a CUDA graph's output): what is fetched is ``ids`` as of this call.
        Default: a device-side copy now, the whole :meth:`fetch_ids` of it in the returned call
        (correct everywhere; no overlap of the copy with the next step).
        """
        snapshot = ids.clone()
        return lambda: self.fetch_ids(snapshot)

    def record_event(self) -> DeviceEvent | None:
        """An event behind the work queued so far on the device's current stream, or ``None``
        when that work cannot still be reading host memory (the default: copies from the host
        have finished when they return, as on the CPU).

        Called by the model runner after queueing the copy of a host buffer it reuses (the
        structured-output bitmask); before writing that buffer again it waits for the event.
        A device with asynchronous host-to-device copies must return an event here.
        """
        return None

    def logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobTensors:
        """The logprob and rank of ``token_ids[r]`` under ``log_softmax(logits[r])`` and each
        row's ``min(k, V)`` most likely ids with their logprobs (a
        :data:`~sagellm.layers.logprobs.LogprobsOp`), without waiting for the device.

        ``logits`` [R, V] are the raw logits, before any mask, penalty, bias or temperature
        (the model runner keeps a copy of the rows that ask: ``request_logits.raw_logprobs``);
        ``0 <= k <= sampling_params.MAX_LOGPROBS`` (requests are validated); ``R`` may be 0.
        Called by the model runner once per step that has logprob rows, after sampling (the
        chosen ids are the sampled ones), and once per step with prompt-logprob rows (the next
        prompt tokens). Alternatives come largest first; equal values in any order. A rank is
        1 + the number of more likely tokens (the default compares float32 logprobs, where two
        logits closer than their rounding tie; a device may compare the logits themselves).
        Default: :func:`~sagellm.layers.logprobs.torch_logprobs` (``log_softmax``, then
        ``gather``, a count and ``topk``); a device may fuse them into fewer passes.
        """
        from sagellm.layers.logprobs import torch_logprobs

        return torch_logprobs(logits, token_ids, k)

    def max_memory_allocated(self) -> int:
        """Peak bytes allocated by torch on the device since the last reset (0 if unknown)."""
        return 0

    def reset_peak_memory(self) -> None:
        """Reset the counter behind :meth:`max_memory_allocated`."""

    def device_name(self) -> str:
        return self.device_type

    @abc.abstractmethod
    def make_kv_backend(self, spec: KVCacheSpec, num_blocks: int) -> KVBackend:
        """Build the KV pool. Called once by the engine after profiling."""

    @abc.abstractmethod
    def make_attention_backend(self) -> AttentionBackend:
        """Build the attention kernels. Called once by the model runner."""

    @abc.abstractmethod
    def make_comm_backend(self, rank: int, world_size: int) -> CommBackend:
        """Build the communication backend once ``torch.distributed`` is initialised.

        Called by each worker of a multi-rank engine after ``init_process_group`` with
        ``capabilities().dist_backend``.
        """

    def register_layers(self, register: LayerRegister) -> None:
        """Offer replacements for core's swappable layers (fused kernels, say).

        Call ``register(kind, Replacement)`` once per :class:`~sagellm.layers.registry.LayerKind`
        this device runs faster; ``Replacement`` subclasses that kind's core class, overrides
        ``forward`` only and reads only the attributes the kind declares. Called once by every
        engine rank right after weights are loaded (before :meth:`prepare_model` and memory
        profiling), which then swaps every exact instance of the core class in the model.
        Default: nothing.
        """

    def register_quantizations(self, register: QuantizationRegister) -> None:
        """Offer the weight-only quantized linears this device runs (``EngineConfig.quantization``).

        Call ``register(WeightClass)`` once per scheme, with a
        :class:`~sagellm.layers.quant_linear.QuantizedWeight` subclass (its ``scheme`` is the
        name users select). Called once by every engine rank after the layer swap of
        :meth:`register_layers`; a scheme the backend does not register is refused with a
        message naming the backend. Default: nothing (weights run as loaded).
        """

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Adapt a freshly loaded model to this device, in place.

        Called once by every engine rank right after the layer swap of :meth:`register_layers`,
        before memory profiling, so the profile measures the model that will run. Default:
        nothing.
        """

    def is_fatal_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` broke the device or the process (``True``) or may be one request's fault.

        Called by ``LLMEngine.step`` when running a step's forward and sampling, or turning one
        sequence's new token into output, raises. ``True`` re-raises and stops the engine (the
        server then reports the engine dead); ``False`` makes the engine retry the step one
        sequence at a time and finish only the requests whose own run raises, with
        ``finish_reason == "error"``.

        Default: ``torch.AcceleratorError`` and a ``RuntimeError`` whose message contains one
        of :data:`FATAL_ERROR_MARKERS` are fatal (after such a fault the CUDA context is
        unusable, so a retry would fail every request). Running out of memory
        (``MemoryError``, ``torch.OutOfMemoryError``) is not: a retry one sequence at a time
        needs less memory, and the cause is usually one large request. A backend whose device
        reports faults differently extends this.
        """
        accelerator_error = getattr(torch, "AcceleratorError", None)
        if accelerator_error is not None and isinstance(exc, accelerator_error):
            return True
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
            return False
        return isinstance(exc, RuntimeError) and any(m in str(exc) for m in FATAL_ERROR_MARKERS)

    def make_model_runner(self, ctx: RunnerContext) -> ModelRunner | None:
        """Optionally return a specialised model runner (CUDA graphs and the like).

        Called once by a single-rank engine (and by the decode worker of a disaggregated one)
        after the KV pool exists. Return an instance of a :class:`~sagellm.runner.ModelRunner`
        subclass built with ``super().__init__(ctx)``, or ``None`` (the default) to use core's.
        Tensor-parallel ranks always run core's runner, which ships every step to the others.
        """
        return None


class Timer:
    """A tiny context manager used by comm backends to time transfers."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t
