"""The body of the two-rank comm test; runs in processes started by ``torch.multiprocessing``."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from sagellm.protocols import KVCacheSpec, Platform


def _fill(kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for k, v in kv_caches:
        k[block] = torch.randn(k[block].shape, generator=gen).to(k.dtype)
        v[block] = torch.randn(v[block].shape, generator=gen).to(v.dtype)


def two_rank_worker(rank: int, platform_cls: type[Platform], devices: tuple[int, int],
                    init_file: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    platform = platform_cls(devices[rank])
    platform.set_device()
    backend = platform_cls.capabilities().dist_backend
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        comm = platform.make_comm_backend(rank, 2)
        assert (comm.rank, comm.world_size) == (rank, 2), (comm.rank, comm.world_size)
        dev = comm.device

        t = torch.full((3,), float(rank + 1), device=dev)
        out = comm.all_reduce(t)
        assert torch.equal(out.cpu(), torch.full((3,), 3.0)), f"all_reduce gave {out}"

        g = torch.full((2, 3), float(rank), device=dev)
        rows = comm.all_gather(g, dim=0).cpu()
        assert rows.shape == (4, 3) and rows[:2].eq(0).all() and rows[2:].eq(1).all(), rows
        cols = comm.all_gather(g, dim=-1).cpu()
        assert cols.shape == (2, 6) and cols[:, :3].eq(0).all() and cols[:, 3:].eq(1).all(), cols

        b = torch.full((4,), float(rank * 10 + 7), device=dev)
        comm.broadcast(b, src=1)
        assert b.cpu().eq(17).all(), f"broadcast from rank 1 gave {b}"
        comm.barrier()

        spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4,
                           dtype=platform_cls.capabilities().default_dtype)
        kv = platform.make_kv_backend(spec, 8)
        if rank == 0:
            _fill(kv.kv_caches(), 1, seed=11)
            _fill(kv.kv_caches(), 4, seed=44)
            comm.send_kv_blocks(kv, [1, 4], dst=1)
            stats = comm.get_bandwidth_stats()
            assert stats.calls_by_op.get("send_kv_blocks") == 1, stats
            assert stats.bytes_by_op["send_kv_blocks"] >= 2 * spec.bytes_per_block, stats
        else:
            comm.recv_kv_blocks(kv, [6, 2], src=0)
            expect = platform.make_kv_backend(spec, 8)
            _fill(expect.kv_caches(), 6, seed=11)
            _fill(expect.kv_caches(), 2, seed=44)
            for (k, v), (ek, ev) in zip(kv.kv_caches(), expect.kv_caches(), strict=True):
                assert torch.equal(k.cpu(), ek.cpu()), "received keys differ from what was sent"
                assert torch.equal(v.cpu(), ev.cpu()), "received values differ from what was sent"
            assert comm.get_bandwidth_stats().calls_by_op.get("recv_kv_blocks") == 1
        assert comm.get_bandwidth_stats().calls_by_op.get("all_reduce", 0) >= 1
        comm.barrier()
    finally:
        dist.destroy_process_group()
