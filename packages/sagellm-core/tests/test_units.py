"""Unit tests of the hardware-neutral parts: block manager, scheduler, sampler, params."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.engine.block_manager import BlockManager
from sagellm.engine.scheduler import Scheduler
from sagellm.engine.sequence import SequenceState, SequenceStatus
from sagellm.layers.sampler import Sampler, SamplingBatch, apply_top_k_top_p
from sagellm.protocols import KVCacheSpec, KVPoolExhausted
from sagellm.sampling_params import SamplingParams

SPEC = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)


def make(num_blocks: int = 16) -> tuple[TorchKVBackend, BlockManager]:
    kv = TorchKVBackend(SPEC, num_blocks, torch.device("cpu"))
    return kv, BlockManager(kv, SPEC.block_size)


def seq(rid: str, n: int, **kw: object) -> SequenceState:
    return SequenceState(rid, list(range(1, n + 1)), SamplingParams(**kw))  # type: ignore[arg-type]


def test_kv_backend_allocate_free_and_usage() -> None:
    kv, _ = make(4)
    ids = kv.allocate_blocks(3)
    assert len(set(ids)) == 3 and kv.num_free_blocks == 1
    with pytest.raises(KVPoolExhausted):
        kv.allocate_blocks(2)
    assert kv.num_free_blocks == 1  # a failed allocation takes nothing
    usage = kv.get_memory_usage()
    assert usage.num_used_blocks == 3 and usage.bytes_total == 4 * SPEC.bytes_per_block
    kv.free_blocks(ids)
    assert kv.num_free_blocks == 4
    with pytest.raises(ValueError):
        kv.free_blocks([ids[0]])


def test_block_manager_ref_counts() -> None:
    kv, bm = make(8)
    a = seq("a", 10)
    bm.allocate(a, 10)
    assert len(a.block_table) == 3
    assert all(bm.ref_counts[i] == 1 for i in a.block_table)
    a.num_computed_tokens = 10
    assert bm.blocks_needed(a, 2) == 0 and bm.blocks_needed(a, 3) == 1
    bm.free(a)
    assert kv.num_free_blocks == 8 and bm.ref_counts == {}


def test_block_manager_fragmentation_counts_empty_slots() -> None:
    _, bm = make(8)
    a = seq("a", 5)
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    st = bm.stats()
    assert (st.num_allocated_slots, st.num_wasted_slots) == (8, 3)
    assert st.fragmentation == pytest.approx(3 / 8)


def test_scheduler_separates_prefill_and_decode_budgets() -> None:
    _, bm = make(64)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=20, max_prefill_tokens=12)
    a, b = seq("a", 10), seq("b", 10)
    sch.add(a)
    sch.add(b)
    plan = sch.schedule()
    assert [(op.seq.request_id, op.start, op.end) for op in plan.prefills] == [("a", 0, 10), ("b", 0, 2)]
    assert not plan.decodes and plan.num_prefill_tokens == 12
    sch.commit(plan)
    a.append_token(99)  # a sampled; b did not (partial chunk)
    plan = sch.schedule()
    assert [op.seq.request_id for op in plan.decodes] == ["a"]
    assert [(op.seq.request_id, op.start, op.end) for op in plan.prefills] == [("b", 2, 10)]
    assert "decode 1 (a)" in plan.describe() and "b[2:10]" in plan.describe()


def test_scheduler_respects_max_num_seqs() -> None:
    _, bm = make(64)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100, max_prefill_tokens=100)
    for i in range(4):
        sch.add(seq(f"s{i}", 4))
    plan = sch.schedule()
    assert len(plan.prefills) == 2 and sch.num_waiting == 2


def test_scheduler_preempts_newest_by_recompute() -> None:
    kv, bm = make(4)  # 16 slots
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_prefill_tokens=64)
    a, b = seq("a", 8), seq("b", 8)
    sch.add(a)
    sch.add(b)
    plan = sch.schedule()
    sch.commit(plan)
    a.append_token(1)
    b.append_token(1)
    plan = sch.schedule()  # both need a 3rd block, only 0 free: b is preempted
    assert plan.preempted == ["b"] and [op.seq.request_id for op in plan.decodes] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_tokens == 9  # keeps its generated token; recomputes all nine
    assert sch.waiting[0] is b and sch.num_preemptions == 1


def test_scheduler_rejects_requests_larger_than_the_pool() -> None:
    _, bm = make(2)
    sch = Scheduler(bm, 4, 64, 64)
    with pytest.raises(ValueError, match="needs 3 KV blocks"):
        sch.add(seq("big", 12))


def test_top_k_top_p_masking() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(apply_top_k_top_p(logits, torch.tensor([2]), None)[0, 2:]).all()
    kept = ~torch.isinf(apply_top_k_top_p(logits, None, torch.tensor([0.7])))
    assert kept.tolist() == [[True, True, False, False]]
    assert not torch.isinf(apply_top_k_top_p(logits, torch.tensor([-1]), torch.tensor([1.0]))).any()


def test_sampler_greedy_seeded_and_distribution() -> None:
    s = Sampler()
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    greedy = SamplingBatch([0.0, 0.0], [-1, -1], [1.0, 1.0], [None, None])
    assert s(logits, greedy).tolist() == [1, 0]
    probs = torch.tensor([0.6, 0.3, 0.1])
    many = probs.log().expand(20000, 3).clone()
    batch = SamplingBatch([1.0] * 20000, [-1] * 20000, [1.0] * 20000, [None] * 20000)
    torch.manual_seed(0)
    freq = torch.bincount(s(many, batch), minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.02)
    def seeded() -> list[int]:
        g = torch.Generator().manual_seed(5)
        return s(many[:50], SamplingBatch([1.0] * 50, [-1] * 50, [1.0] * 50, [g] + [None] * 49)).tolist()
    first = seeded()
    assert all(seeded()[0] == first[0] for _ in range(5))


def test_sampling_params_validation() -> None:
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(top_k=0).top_k == -1
    for bad in ({"temperature": -1}, {"top_p": 1.5}, {"top_p": 0}, {"max_tokens": 0},
                {"top_k": -5}, {"stop": [""]}, {"min_tokens": 5, "max_tokens": 2}, {"bogus": 1}):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)  # type: ignore[arg-type]


def test_mlp_row_chunking_matches_one_pass() -> None:
    from transformers import LlamaConfig

    from sagellm.layers.parallel import SINGLE
    from sagellm.models.llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64), tp=SINGLE)
    for p in mlp.parameters():
        p.data.normal_()
    x = torch.randn(50, 32)
    whole = mlp(x)
    mlp.chunk_tokens = 16  # 50 rows -> chunks of 16, 16, 16, 2
    assert torch.allclose(mlp(x), whole, atol=1e-5)


def test_sequence_status_finished_is_every_status_but_waiting_and_running() -> None:
    finished = {s.value for s in SequenceStatus if s.finished}
    assert finished == {"stop", "length", "abort", "error"}


def test_scheduler_without_a_window_keeps_every_block_and_can_allocate_with_none_free() -> None:
    kv = TorchKVBackend(KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, block_size=4,
                                    dtype=torch.float32), num_blocks=2, device=torch.device("cpu"))
    bm = BlockManager(kv, 4)
    sched = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_prefill_tokens=64)
    seq = SequenceState("a", list(range(1, 8)), SamplingParams(max_tokens=4))
    sched.add(seq)
    sched.commit(sched.schedule())  # 7 prompt tokens: both blocks
    assert bm.num_free_blocks == 0 and len(seq.block_table) == 2
    seq.append_token(9)  # the 8th token still fits the second block
    assert bm.can_allocate(seq, 1) and not bm.can_allocate(seq, 2)
    plan = sched.schedule()
    assert [op.seq for op in plan.decodes] == [seq] and len(seq.block_table) == 2
