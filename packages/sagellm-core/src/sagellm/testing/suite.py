"""``BackendSuite``: the conformance tests every sageLLM backend runs.

Subclass it in one line in a test module::

    from sagellm.testing import BackendSuite
    from my_backend.platform import MyPlatform

    class TestMyBackend(BackendSuite):
        platform_cls = MyPlatform

Every test is skipped, with the platform's own reason, when ``platform_cls.is_available()`` says
no; the contract checks that need no device (``test_platform_contract``) always run. Class
attributes below adapt the suite to a device's limits (supported block sizes, head dims, dtypes).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from sagellm.protocols import (
    CONTRACT_VERSION,
    OLDEST_CONTRACT_VERSION,
    AttentionBackend,
    AttentionLayerSpec,
    Availability,
    Capabilities,
    CommBackend,
    KVBackend,
    KVCacheSpec,
    KVMemoryUsage,
    KVPoolExhausted,
    MemoryInfo,
    Platform,
)
from sagellm.sampling_params import SamplingParams
from sagellm.testing.reference import PagedCase, make_paged_case

#: (id, seq_lens, context_lens, num_heads, num_kv_heads) of the prefill cases.
PREFILL_CASES = [
    ("one-seq-mha", [7], [0], 4, 4),
    ("batch-gqa", [5, 9, 1], [0, 0, 0], 8, 2),
    ("prefix-gqa", [12, 6], [5, 4], 4, 2),
    ("prefix-one-new-token", [17, 9], [16, 3], 4, 1),
]
#: (id, seq_lens, num_heads, num_kv_heads) of the decode cases.
DECODE_CASES = [
    ("mha", [1, 6, 13], 4, 4),
    ("gqa-block-edges", [4, 8, 9], 8, 2),
    ("mqa", [3, 21], 4, 1),
]
#: (id, spec) of the sliding-window and soft-cap attention cases (run where capabilities say so).
LAYER_SPEC_CASES = [
    ("window-3", AttentionLayerSpec(sliding_window=3)),
    ("soft-cap", AttentionLayerSpec(logits_soft_cap=1.0)),
    ("window-5-soft-cap", AttentionLayerSpec(sliding_window=5, logits_soft_cap=1.0)),
]
TOLERANCES = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


class BackendSuite:
    """Conformance tests for one :class:`~sagellm.protocols.Platform` subclass."""

    #: The platform under test (required).
    platform_cls: ClassVar[type[Platform]]
    #: Environment set while the class runs (e.g. a test-only emulation switch).
    platform_env: ClassVar[dict[str, str]] = {}
    device_index: ClassVar[int] = 0
    #: dtype of the attention and KV tests; ``None``: float32 if supported, else the default.
    dtype: ClassVar[torch.dtype | None] = None
    #: Block size and head dim of the attention tests (raise them for kernels with alignment rules).
    block_size: ClassVar[int] = 4
    head_dim: ClassVar[int] = 16
    #: Device indices of the two ranks of the comm test ((0, 1) on real multi-device hosts).
    two_rank_devices: ClassVar[tuple[int, int]] = (0, 0)
    #: Compare only the first N generated tokens with the CPU backend (``None``: all of them).
    #: Lower it for half-precision devices, where greedy paths may legitimately diverge late.
    e2e_match_tokens: ClassVar[int | None] = None

    # -- fixtures --------------------------------------------------------------------------

    # Class-scoped fixtures are classmethods: they run once per class, so they must not look
    # like they could set attributes on a test instance (pytest 9.1 deprecates that form).

    @pytest.fixture(scope="class")
    @classmethod
    def suite_env(cls) -> Iterator[None]:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in cls.platform_env.items():
                mp.setenv(key, value)
            yield

    @pytest.fixture(scope="class")
    @classmethod
    def platform(cls, suite_env: None) -> Platform:
        avail = cls.platform_cls.is_available()
        if not avail.available:
            pytest.skip(f"{cls.platform_cls.name} unavailable: {avail.reason}")
        return cls.platform_cls(cls.device_index)

    @pytest.fixture(scope="class")
    @classmethod
    def test_dtype(cls, platform: Platform) -> torch.dtype:
        caps = platform.capabilities()
        if cls.dtype is not None:
            return cls.dtype
        return torch.float32 if torch.float32 in caps.dtypes else caps.default_dtype

    def _spec(self, dtype: torch.dtype, num_kv_heads: int = 2, num_layers: int = 2) -> KVCacheSpec:
        return KVCacheSpec(num_layers=num_layers, num_kv_heads=num_kv_heads,
                           head_dim=self.head_dim, block_size=self.block_size, dtype=dtype)

    # -- platform --------------------------------------------------------------------------

    def test_platform_contract(self, suite_env: None) -> None:
        cls = self.platform_cls
        assert isinstance(cls.name, str) and cls.name, "Platform.name must be a non-empty string"
        assert isinstance(cls.device_type, str) and cls.device_type
        assert OLDEST_CONTRACT_VERSION <= cls.contract_version <= CONTRACT_VERSION, (
            f"{cls.__name__} targets contract v{cls.contract_version}, core supports "
            f"v{OLDEST_CONTRACT_VERSION}..v{CONTRACT_VERSION}")
        avail = cls.is_available()  # must not raise, available or not
        assert isinstance(avail, Availability)
        if not avail.available:
            assert avail.reason.strip(), "an unavailable platform must say why"
        caps = cls.capabilities()
        assert isinstance(caps, Capabilities)
        assert caps.default_dtype in caps.dtypes
        assert caps.dist_backend

    def test_platform_factories(self, platform: Platform) -> None:
        mem = platform.memory_info()
        assert isinstance(mem, MemoryInfo)
        assert 0 <= mem.free_bytes <= mem.total_bytes and mem.total_bytes > 0
        assert isinstance(platform.make_attention_backend(), AttentionBackend)
        assert isinstance(platform.device_name(), str)
        platform.set_device()
        platform.synchronize()
        platform.reset_peak_memory()
        assert platform.max_memory_allocated() >= 0
        platform.empty_cache()

    def test_host_transfers(self, platform: Platform) -> None:
        host = torch.arange(5, dtype=torch.int64)
        dev = platform.to_device(host)
        assert dev.device.type == platform.device.type and dev.dtype == torch.int64
        assert platform.fetch_ids(dev * 3) == [0, 3, 6, 9, 12]
        assert platform.fetch_ids(dev[:0]) == []
        # start_fetch brings the ids as they were at the call, even if later queued work
        # overwrites them (asynchronous scheduling queues the next step in between).
        buf = dev * 2
        wait = platform.start_fetch(buf[1:4])
        buf.fill_(-7)
        assert wait() == [2, 4, 6]

    # -- swappable layers ------------------------------------------------------------------

    def test_layer_replacements(self, platform: Platform, test_dtype: torch.dtype) -> None:
        """Every replacement the platform registers is allowed for its kind (a subclass of
        core's layer with no state of its own) and matches core's layer numerically."""
        from sagellm.layers.registry import SWAPPABLE_LAYERS, layer_overrides
        from sagellm.testing.layers import check_layer_replacement

        overrides = layer_overrides(platform)  # checks each registration
        tol = TOLERANCES.get(test_dtype, 6e-2)
        for spec in SWAPPABLE_LAYERS.values():
            if spec.base in overrides:
                check_layer_replacement(spec.kind, overrides[spec.base], platform.device,
                                        test_dtype, tol)

    # -- KV pool ---------------------------------------------------------------------------

    def test_kv_allocate_free(self, platform: Platform, test_dtype: torch.dtype) -> None:
        kv = platform.make_kv_backend(self._spec(test_dtype), 6)
        assert isinstance(kv, KVBackend) and kv.num_free_blocks == 6
        a = kv.allocate_blocks(2)
        b = kv.allocate_blocks(3)
        ids = a + b
        assert len(set(ids)) == 5 and all(0 <= i < 6 for i in ids), ids
        assert kv.num_free_blocks == 1
        with pytest.raises(KVPoolExhausted):
            kv.allocate_blocks(2)
        assert kv.num_free_blocks == 1, "a failed allocation must allocate nothing"
        kv.free_blocks(a)
        assert kv.num_free_blocks == 3
        with pytest.raises(ValueError):
            kv.free_blocks([a[0]])  # double free
        spare = next(i for i in range(6) if i not in ids)
        with pytest.raises(ValueError):
            kv.free_blocks([spare])  # never allocated
        again = kv.allocate_blocks(3)
        assert set(again).isdisjoint(b), "an allocated block was handed out twice"
        assert kv.allocate_blocks(0) == []

    def test_kv_caches_layout(self, platform: Platform, test_dtype: torch.dtype) -> None:
        spec = self._spec(test_dtype, num_kv_heads=3, num_layers=3)
        kv = platform.make_kv_backend(spec, 5)
        caches = kv.kv_caches()
        assert len(caches) == spec.num_layers
        for k, v in caches:
            for t in (k, v):
                assert tuple(t.shape) == (5, spec.block_size, 3, spec.head_dim), t.shape
                assert t.dtype == test_dtype
                assert t.device.type == platform.device.type
        again = kv.kv_caches()
        assert all(k1 is k2 and v1 is v2 for (k1, v1), (k2, v2) in zip(caches, again, strict=True)), (
            "kv_caches() must return the same tensors every call")

    def test_kv_memory_usage(self, platform: Platform, test_dtype: torch.dtype) -> None:
        spec = self._spec(test_dtype)
        kv = platform.make_kv_backend(spec, 4)
        kv.allocate_blocks(3)
        usage = kv.get_memory_usage()
        assert isinstance(usage, KVMemoryUsage)
        assert (usage.num_blocks, usage.num_free_blocks, usage.num_used_blocks) == (4, 1, 3)
        assert usage.block_size == spec.block_size
        assert usage.bytes_total >= 4 * spec.bytes_per_block

    # -- attention -------------------------------------------------------------------------

    def _case(self, seq_lens: list[int], ctx: list[int], heads: int, kv_heads: int) -> PagedCase:
        return make_paged_case(seq_lens, ctx, heads, kv_heads, self.head_dim, self.block_size,
                               seed=sum(seq_lens) * 31 + heads)

    def _pool(self, platform: Platform, case: PagedCase, kv_heads: int, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
        kv = platform.make_kv_backend(self._spec(dtype, kv_heads, num_layers=1), case.num_blocks)
        return kv.kv_caches()[0]

    def _write(self, attn: AttentionBackend, case: PagedCase, kc: torch.Tensor, vc: torch.Tensor,
               ranges: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Write tokens ``ranges[i]`` of every sequence; returns the flat keys/values written."""
        dev, dt = kc.device, kc.dtype
        keys = torch.cat([case.keys[i][s:e] for i, (s, e) in enumerate(ranges)]).to(dev, dt)
        values = torch.cat([case.values[i][s:e] for i, (s, e) in enumerate(ranges)]).to(dev, dt)
        slots = [x for i, (s, e) in enumerate(ranges) for x in case.slots(i, s, e)]
        attn.write_kv(keys, values, kc, vc, torch.tensor(slots, dtype=torch.int64, device=dev))
        return keys, values

    def _check_pool(self, case: PagedCase, kc: torch.Tensor, vc: torch.Tensor, tol: float) -> None:
        """Every token sits at its slot; blocks no sequence owns are untouched (zero)."""
        kcpu, vcpu = kc.float().cpu(), vc.float().cpu()
        bs = case.block_size
        for i, table in enumerate(case.block_tables):
            for pos in range(case.seq_lens[i]):
                blk, off = table[pos // bs], pos % bs
                assert torch.allclose(kcpu[blk, off], case.keys[i][pos], atol=tol, rtol=tol), (
                    f"key of sequence {i} position {pos} not found in block {blk} slot {off}")
                assert torch.allclose(vcpu[blk, off], case.values[i][pos], atol=tol, rtol=tol)
        owned = {b for t in case.block_tables for b in t}
        for blk in set(range(case.num_blocks)) - owned:
            assert kcpu[blk].eq(0).all() and vcpu[blk].eq(0).all(), f"stray write into block {blk}"

    @pytest.mark.parametrize("case_id,seq_lens,ctx,heads,kv_heads", PREFILL_CASES,
                             ids=[c[0] for c in PREFILL_CASES])
    def test_attention_prefill(self, platform: Platform, test_dtype: torch.dtype, case_id: str,
                               seq_lens: list[int], ctx: list[int], heads: int, kv_heads: int) -> None:
        attn = platform.make_attention_backend()
        case = self._case(seq_lens, ctx, heads, kv_heads)
        kc, vc = self._pool(platform, case, kv_heads, test_dtype)
        if any(ctx):
            self._write(attn, case, kc, vc, [(0, c) for c in ctx])
        key, value = self._write(attn, case, kc, vc, list(zip(ctx, seq_lens, strict=True)))
        query = torch.cat(case.queries).to(kc.device, test_dtype)
        scale = self.head_dim ** -0.5
        out = attn.prefill(query, key, value, kc, vc, case.prefill_metadata(kc.device), scale)
        tol = TOLERANCES.get(test_dtype, 6e-2)
        assert tuple(out.shape) == tuple(query.shape)
        torch.testing.assert_close(out.double().cpu(), case.expected(scale), atol=tol, rtol=tol)
        self._check_pool(case, kc, vc, tol)

    @pytest.mark.parametrize("case_id,seq_lens,heads,kv_heads", DECODE_CASES,
                             ids=[c[0] for c in DECODE_CASES])
    def test_attention_decode(self, platform: Platform, test_dtype: torch.dtype, case_id: str,
                              seq_lens: list[int], heads: int, kv_heads: int) -> None:
        attn = platform.make_attention_backend()
        ctx = [s - 1 for s in seq_lens]
        case = self._case(seq_lens, ctx, heads, kv_heads)
        kc, vc = self._pool(platform, case, kv_heads, test_dtype)
        if any(ctx):
            self._write(attn, case, kc, vc, [(0, c) for c in ctx])
        self._write(attn, case, kc, vc, list(zip(ctx, seq_lens, strict=True)))
        query = torch.cat(case.queries).to(kc.device, test_dtype)
        scale = self.head_dim ** -0.5
        out = attn.decode(query, kc, vc, case.decode_metadata(kc.device), scale)
        tol = TOLERANCES.get(test_dtype, 6e-2)
        torch.testing.assert_close(out.double().cpu(), case.expected(scale), atol=tol, rtol=tol)
        self._check_pool(case, kc, vc, tol)

    @staticmethod
    def _lacks(platform: Platform, layer: AttentionLayerSpec) -> list[str]:
        """What of ``layer`` the platform's capabilities do not claim (empty: all of it)."""
        caps = platform.capabilities()
        lacking = []
        if layer.sliding_window is not None and not caps.supports_sliding_window:
            lacking.append("sliding-window")
        if layer.logits_soft_cap is not None and not caps.supports_logits_soft_cap:
            lacking.append("soft-capping")
        return lacking

    @pytest.mark.parametrize("case_id,layer", LAYER_SPEC_CASES, ids=[c[0] for c in LAYER_SPEC_CASES])
    def test_attention_layer_spec(self, platform: Platform, test_dtype: torch.dtype, case_id: str,
                                  layer: AttentionLayerSpec) -> None:
        """Prefill (with and without a cached prefix) and decode honour a layer's sliding
        window and soft-cap, where the platform's capabilities claim them; where they do not,
        a model with such a layer is refused for the platform (never run as full attention)."""
        lacking = self._lacks(platform, layer)
        if lacking:
            from sagellm.layers.attention import Attention, unsupported_attention

            model = torch.nn.ModuleList([Attention(0, 4, 2, self.head_dim, self.head_dim ** -0.5,
                                                   sliding_window=layer.sliding_window,
                                                   logits_soft_cap=layer.logits_soft_cap)])
            found = " ".join(unsupported_attention(model, platform.capabilities()))
            for feature in lacking:
                assert feature in found, (feature, found)
            return
        attn = platform.make_attention_backend()
        scale = self.head_dim ** -0.5
        tol = TOLERANCES.get(test_dtype, 6e-2)
        for seq_lens, ctx in (([9, 4], [0, 0]), ([12, 7], [6, 2])):
            case = self._case(seq_lens, ctx, 4, 2)
            kc, vc = self._pool(platform, case, 2, test_dtype)
            if any(ctx):
                self._write(attn, case, kc, vc, [(0, c) for c in ctx])
            key, value = self._write(attn, case, kc, vc, list(zip(ctx, seq_lens, strict=True)))
            query = torch.cat(case.queries).to(kc.device, test_dtype)
            out = attn.prefill(query, key, value, kc, vc, case.prefill_metadata(kc.device), scale,
                               layer=layer)
            torch.testing.assert_close(out.double().cpu(), case.expected(scale, layer),
                                       atol=tol, rtol=tol)
        seq_lens = [1, 6, 13]
        case = self._case(seq_lens, [s - 1 for s in seq_lens], 4, 2)
        kc, vc = self._pool(platform, case, 2, test_dtype)
        self._write(attn, case, kc, vc, [(0, s) for s in seq_lens])
        query = torch.cat(case.queries).to(kc.device, test_dtype)
        out = attn.decode(query, kc, vc, case.decode_metadata(kc.device), scale, layer=layer)
        torch.testing.assert_close(out.double().cpu(), case.expected(scale, layer),
                                   atol=tol, rtol=tol)

    @pytest.mark.parametrize("variant", ["poisoned", "no-block"])
    def test_window_reads_no_freed_block(self, platform: Platform, test_dtype: torch.dtype,
                                         variant: str) -> None:
        """Where ``Capabilities.skips_out_of_window_blocks`` is claimed, windowed prefill and
        decode read no block the engine may have freed (wholly before the window of the
        sequence's first query): those blocks are filled with NaN, and their table entries
        either keep the block id (``poisoned``: any read shows in the output) or become
        ``NO_BLOCK`` (as the engine passes them); the output matches the dense reference.
        Windows below, at and above the block size.

        A platform that does not claim it is checked for the other side of the contract: the
        engine frees no block behind any window on it (so its attention may read them all)."""
        from torch import nn

        from sagellm.layers.attention import Attention, freed_kv_window
        from sagellm.protocols import NO_BLOCK

        caps = platform.capabilities()
        windowed = nn.ModuleList(Attention(i, 2, 2, self.head_dim, sliding_window=self.block_size)
                                 for i in range(2))
        if not caps.skips_out_of_window_blocks:
            assert freed_kv_window(windowed, caps) is None, (
                f"{platform.name} does not claim skips_out_of_window_blocks, yet the engine would "
                f"free blocks behind a window on it")
            return
        assert freed_kv_window(windowed, caps) == self.block_size
        attn = platform.make_attention_backend()
        scale = self.head_dim ** -0.5
        tol = TOLERANCES.get(test_dtype, 6e-2)
        bs = self.block_size
        for window in sorted({max(1, bs // 2), bs, bs + 3}):
            layer = AttentionLayerSpec(sliding_window=window)
            for kind, seq_lens, ctx in (
                    ("prefill", [4 * bs + 3, 3 * bs + 1, 2 * bs], [3 * bs + 1, 2 * bs + 2, bs]),
                    ("decode", [4 * bs + 2, 3 * bs, 2], [4 * bs + 1, 3 * bs - 1, 1])):
                case = self._case(seq_lens, ctx, 4, 2)
                kc, vc = self._pool(platform, case, 2, test_dtype)
                self._write(attn, case, kc, vc, [(0, c) for c in ctx])
                key, value = self._write(attn, case, kc, vc, list(zip(ctx, seq_lens, strict=True)))
                # The engine frees blocks before the first query's window: key <= ctx - window.
                freed = [max(0, c - window + 1) // bs for c in ctx]
                padded = any(len(t) < max(map(len, case.block_tables)) for t in case.block_tables)
                for table, n in zip(case.block_tables, freed, strict=True):
                    for blk in table[:n]:
                        if not (blk == 0 and padded):  # block 0 is also the tables' padding
                            kc[blk] = float("nan")
                            vc[blk] = float("nan")
                query = torch.cat(case.queries).to(kc.device, test_dtype)
                meta = (case.prefill_metadata(kc.device) if kind == "prefill"
                        else case.decode_metadata(kc.device))
                if variant == "no-block":
                    for row, n in enumerate(freed):
                        meta.block_tables[row, :n] = NO_BLOCK
                if kind == "prefill":
                    out = attn.prefill(query, key, value, kc, vc, meta, scale, layer=layer)
                else:
                    out = attn.decode(query, kc, vc, meta, scale, layer=layer)
                got = out.double().cpu()
                assert torch.isfinite(got).all(), (
                    f"{kind} with window {window} read a freed block ({variant})")
                torch.testing.assert_close(got, case.expected(scale, layer), atol=tol, rtol=tol)

    def test_write_kv_skips_negative_slots(self, platform: Platform, test_dtype: torch.dtype) -> None:
        attn = platform.make_attention_backend()
        kv = platform.make_kv_backend(self._spec(test_dtype, num_layers=1), 3)
        kc, vc = kv.kv_caches()[0]
        n = 3
        key = torch.ones(n, 2, self.head_dim, dtype=test_dtype, device=kc.device)
        slots = torch.tensor([self.block_size + 1, -1, 2 * self.block_size], device=kc.device)
        attn.write_kv(key, -key, kc, vc, slots)
        written = kc.float().cpu().reshape(-1, 2, self.head_dim).abs().sum(dim=(1, 2)) > 0
        assert written.nonzero().flatten().tolist() == [self.block_size + 1, 2 * self.block_size]
        assert vc.float().cpu().reshape(-1, 2, self.head_dim)[self.block_size + 1].eq(-1).all()

    # -- communication ---------------------------------------------------------------------

    def test_comm_one_rank(self, platform: Platform) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            pytest.skip("torch.distributed is already initialised in this process")
        backend = platform.capabilities().dist_backend
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=0, world_size=1)
            try:
                comm = platform.make_comm_backend(0, 1)
                assert isinstance(comm, CommBackend)
                assert (comm.rank, comm.world_size) == (0, 1)
                t = torch.arange(6, dtype=torch.float32, device=comm.device).reshape(2, 3)
                assert torch.equal(comm.all_reduce(t.clone()).cpu(), t.cpu())
                assert torch.equal(comm.all_gather(t, dim=0).cpu(), t.cpu())
                assert torch.equal(comm.broadcast(t.clone(), src=0).cpu(), t.cpu())
                comm.barrier()
                stats = comm.get_bandwidth_stats()
                assert isinstance(stats.as_dict(), dict)
            finally:
                dist.destroy_process_group()

    def test_comm_two_ranks(self, platform: Platform) -> None:
        import torch.multiprocessing as mp

        from sagellm.testing._comm_worker import two_rank_worker

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(two_rank_worker, nprocs=2, join=True,
                     args=(self.platform_cls, self.two_rank_devices, f"{tmp}/init",
                           dict(self.platform_env)))

    # -- end to end ------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def tiny_model(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        from sagellm.testing.tiny_model import make_tiny_llama

        return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))

    #: Families of :data:`sagellm.testing.families.TINY_FAMILIES` run end to end against the CPU
    #: backend (or, where a family needs attention the platform lacks, refused by the engine).
    e2e_families: ClassVar[tuple[str, ...]] = ("qwen3", "gemma2", "phi3")

    @pytest.fixture(scope="class")
    @classmethod
    def family_models(cls, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        from sagellm.testing.families import save_tiny_family

        return {f: save_tiny_family(tmp_path_factory.mktemp(f), f) for f in cls.e2e_families}

    def test_families_match_cpu(self, platform: Platform, family_models: dict[str, Path]) -> None:
        """Each family in :attr:`e2e_families` generates on this backend what it generates on
        the CPU backend (which the parity tests hold to transformers); a family whose sliding
        window or soft-cap the platform's capabilities lack is refused, naming the feature."""
        from sagellm.backends.cpu import CpuPlatform
        from sagellm.config import EngineConfig
        from sagellm.layers.attention import unsupported_attention
        from sagellm.loader.loader import load_model

        if type(platform) is CpuPlatform:
            pytest.skip("the CPU backend is the reference (tests/test_families.py holds it to "
                        "transformers)")
        for family, model_dir in family_models.items():
            model = load_model(EngineConfig(model=str(model_dir), load_format="dummy"),
                               torch.device("cpu"), torch.float32, load_tokenizer=False).model
            lacking = unsupported_attention(model, platform.capabilities())
            if lacking:
                with pytest.raises(ValueError, match=re.escape(lacking[0])):
                    self._generate_as_cpu(platform, model_dir)
                continue
            got, want = self._generate_as_cpu(platform, model_dir)
            assert got == want, family

    def test_moe_matches_cpu(self, platform: Platform, tmp_path: Path) -> None:
        """A tiny Qwen3-MoE (one dense layer, one of 6 experts top-3) generates on this backend
        what it generates on the CPU backend, through whatever ``MOE_EXPERTS`` layer the
        platform registers (core's torch path otherwise)."""
        from sagellm.backends.cpu import CpuPlatform
        from sagellm.testing.tiny_moe import save_tiny_moe

        if type(platform) is CpuPlatform:
            pytest.skip("the CPU backend is the reference (tests/test_moe.py holds it to "
                        "transformers)")
        got, want = self._generate_as_cpu(platform, save_tiny_moe(tmp_path / "qwen3_moe",
                                                                   "qwen3_moe"))
        assert got == want

    def _generate_as_cpu(self, platform: Platform, model_dir: Path
                         ) -> tuple[list[list[int]], list[list[int]]]:
        """Greedy tokens of ``model_dir`` on ``platform`` and on the CPU backend, two parity
        prompts, each cut to the first :attr:`e2e_match_tokens` (float32 where the platform
        runs it, else its default dtype on both)."""
        from sagellm.backends.cpu import CpuPlatform
        from sagellm.testing.families import PARITY_PROMPT_LEN
        from sagellm.testing.tiny_model import greedy_generate

        kwargs: dict[str, Any] = {}
        if torch.float32 not in platform.capabilities().dtypes:
            kwargs["dtype"] = "auto"
        prompts = [list(range(3, 3 + PARITY_PROMPT_LEN)), [7, 8, 9]]
        n = self.e2e_match_tokens
        got = greedy_generate(platform, model_dir, prompts, max_tokens=8, **kwargs)
        want = greedy_generate(CpuPlatform(), model_dir, prompts, max_tokens=8, **kwargs)
        return [g[:n] for g in got], [w[:n] for w in want]

    E2E_PROMPTS: ClassVar[list[list[int]]] = [
        [5, 6, 7],
        [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
        [3, 1, 4, 1, 5, 9, 2, 6],
    ]

    def test_model_runner_from_context(self, platform: Platform, tiny_model: Path) -> None:
        """The engine runs the platform's runner (``make_model_runner``), a ``ModelRunner``
        built from the engine's context; running a plan again, whole or one sequence at a
        time, before committing it gives the same tokens (the engine relies on it to isolate
        a failing request)."""
        from sagellm.config import EngineConfig
        from sagellm.engine.llm_engine import LLMEngine
        from sagellm.plugins import Registry
        from sagellm.runner import ModelRunner, StepPlan

        config = EngineConfig(model=str(tiny_model), block_size=4, num_kv_blocks=64,
                              max_num_batched_tokens=32, max_prefill_tokens=16,
                              dtype="float32" if torch.float32 in platform.capabilities().dtypes
                              else "auto")
        engine = LLMEngine(config, registry=Registry(), platform=platform)
        runner = engine.runner
        assert isinstance(runner, ModelRunner)
        assert runner.platform is platform and runner.kv is engine.kv
        assert runner.ctx.config is engine.config and runner.ctx.model is engine.model
        if type(platform).make_model_runner is not Platform.make_model_runner:
            assert type(runner) is not ModelRunner, "the platform's make_model_runner was not used"
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        for prompt in self.E2E_PROMPTS[:2]:
            engine.add_request(list(prompt), params)
        for _ in range(3):  # a prefill step, then decodes
            plan = engine.scheduler.schedule()
            first = runner.execute(plan)
            assert len(first) == len(plan.sampling_seqs())
            assert runner.execute(plan) == first
            alone = [runner.execute(StepPlan(plan.step_id, prefills=[op])) for op in plan.prefills
                     if op.samples]
            alone += [runner.execute(StepPlan(plan.step_id, decodes=[op])) for op in plan.decodes]
            assert [t for ids in alone for t in ids] == first
            engine.scheduler.commit(plan)
            for seq, tok in zip(plan.sampling_seqs(), first, strict=True):
                seq.append_token(tok)
        engine.shutdown()

    def test_generate_matches_cpu(self, platform: Platform, tiny_model: Path) -> None:
        """Greedy generation on this backend equals the built-in CPU backend's, token for token.

        The settings force chunked prefill (a 21-token prompt over 16-token prefill budgets),
        decode across block edges (block size 4) and batched decode of sequences of different
        lengths.
        """
        from sagellm.backends.cpu import CpuPlatform
        from sagellm.testing.tiny_model import greedy_generate

        kwargs: dict[str, Any] = {}
        if torch.float32 not in platform.capabilities().dtypes:
            kwargs["dtype"] = "auto"
        got = greedy_generate(platform, tiny_model, self.E2E_PROMPTS, max_tokens=8, **kwargs)
        want = greedy_generate(CpuPlatform(), tiny_model, self.E2E_PROMPTS, max_tokens=8, **kwargs)
        n = self.e2e_match_tokens
        assert [g[:n] for g in got] == [w[:n] for w in want]
        assert all(len(g) == 8 for g in got)
