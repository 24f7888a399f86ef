"""The CPU backend's decode against the torch reference: views of consecutive blocks, the slot
gather of scattered ones, GQA, ragged lengths, and the plan kept across layers of one step."""

from __future__ import annotations

import pytest
import torch

from sagellm.backends.cpu_attention import CpuAttentionBackend, decode_plan
from sagellm.backends.torch_attention import TorchAttentionBackend
from sagellm.protocols import DecodeMetadata

BS, HKV, D = 4, 2, 8


def _case(lens: list[int], scattered: bool, heads: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(len(lens) * 7 + heads)
    kc = torch.randn(64, BS, HKV, D, generator=g)
    vc = torch.randn(64, BS, HKV, D, generator=g)
    width = max(-(-n // BS) for n in lens) + 1  # one padding column, as the runner may give
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    nxt = 3
    for i, n in enumerate(lens):
        nb = -(-n // BS)
        ids = (torch.arange(nb) * (len(lens) + 1) + i + 1) if scattered else torch.arange(nxt, nxt + nb)
        nxt += nb
        tables[i, :nb] = ids.int()
    meta = DecodeMetadata(torch.tensor(lens, dtype=torch.int32), tables, max(lens))
    q = torch.randn(len(lens), heads, D, generator=g)
    return q, kc, vc, meta


@pytest.mark.parametrize("lens", [[1], [9], [5, 13, 2], [16, 16]])
@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("heads", [2, 6])
def test_decode_matches_reference(lens: list[int], scattered: bool, heads: int) -> None:
    q, kc, vc, meta = _case(lens, scattered, heads)
    ref = TorchAttentionBackend().decode(q, kc, vc, meta, 0.3)
    fresh = DecodeMetadata(meta.seq_lens, meta.block_tables, meta.max_seq_len)
    got = CpuAttentionBackend().decode(q, kc, vc, fresh, 0.3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    plan = decode_plan(fresh, BS)
    # Consecutive blocks are read in place; scattered ones (over one block) are gathered.
    assert (plan.spans is not None) == (not scattered or max(lens) <= BS)


def test_plan_is_made_once_per_step_and_sees_new_keys() -> None:
    q, kc, vc, meta = _case([6, 3], True, 4)
    attn = CpuAttentionBackend()
    attn.decode(q, kc, vc, meta, 0.3)
    plan = decode_plan(meta, BS)
    kc2 = kc.clone()
    kc2[meta.block_tables[0, 1], 1] += 1.0  # the newest token of sequence 0, in another layer
    out = attn.decode(q, kc2, vc, meta, 0.3)
    assert decode_plan(meta, BS) is plan
    torch.testing.assert_close(out, TorchAttentionBackend().decode(q, kc2, vc, meta, 0.3))


@pytest.mark.parametrize("dtype", [torch.int32, torch.long])
@pytest.mark.parametrize("slots", [[5, 9, 2], [5, -1, 2, -1], [-1]])
def test_write_kv_matches_reference_and_skips_padding(dtype: torch.dtype, slots: list[int]) -> None:
    g = torch.Generator().manual_seed(len(slots))
    key, value = torch.randn(len(slots), HKV, D, generator=g), torch.randn(len(slots), HKV, D)
    mapping = torch.tensor(slots, dtype=dtype)
    caches = [torch.zeros(4, BS, HKV, D) for _ in range(4)]
    TorchAttentionBackend().write_kv(key, value, caches[0], caches[1], mapping)
    CpuAttentionBackend().write_kv(key, value, caches[2], caches[3], mapping)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    flat = caches[2].view(-1, HKV, D)
    for i, s in enumerate(slots):
        if s >= 0:
            assert torch.equal(flat[s], key[i])
    assert int((flat.abs().sum((1, 2)) > 0).sum()) == sum(s >= 0 for s in slots)


@pytest.mark.parametrize("scattered", [False, True])
def test_bfloat16_decode_matches_reference(scattered: bool) -> None:
    # float32 spans run as bmm + softmax; bfloat16 ones keep the float32-accumulating kernel.
    q, kc, vc, meta = _case([9, 14], scattered, 6)
    q, kc, vc = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    ref = TorchAttentionBackend().decode(q.float(), kc.float(), vc.float(), meta, 0.3)
    fresh = DecodeMetadata(meta.seq_lens, meta.block_tables, meta.max_seq_len)
    got = CpuAttentionBackend().decode(q, kc, vc, fresh, 0.3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
