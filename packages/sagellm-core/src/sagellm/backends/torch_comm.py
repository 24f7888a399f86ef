"""A :class:`CommBackend` over ``torch.distributed``: gloo, NCCL, HCCL and CNCL alike.

Every backend shipped with sageLLM uses this class with its own process-group backend; the
timing and bandwidth bookkeeping live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from sagellm.protocols import BandwidthStats, CommBackend, KVBackend, Timer


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class TorchDistributedComm(CommBackend):
    """Collectives on the default process group (or ``group``), timed per op."""

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None,
                 sync: bool = False, synchronize: Callable[[], None] | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
        self._device = device
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._stats = BandwidthStats()
        # Timings are only meaningful when the op finished; accelerators queue work, so a
        # backend that wants exact numbers passes sync=True and how to wait for its device
        # (``synchronize=platform.synchronize``); it costs a device sync per op.
        self._sync = sync
        self._synchronize = synchronize

    @property
    def device(self) -> torch.device:
        return self._device

    def _done(self) -> None:
        if self._sync and self._synchronize is not None:
            self._synchronize()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        with Timer() as t:
            dist.all_reduce(tensor, group=self.group)
            self._done()
        self._stats.record("all_reduce", _nbytes(tensor), t.seconds)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        with Timer() as t:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor.contiguous(), group=self.group)
            out = torch.cat(parts, dim=dim)
            self._done()
        self._stats.record("all_gather", _nbytes(out), t.seconds)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        with Timer() as t:
            dist.broadcast(tensor, src=src, group=self.group)
            self._done()
        self._stats.record("broadcast", _nbytes(tensor), t.seconds)
        return tensor

    def _header(self, kv: KVBackend, block_ids: Sequence[int]) -> torch.Tensor:
        spec = kv.spec
        return torch.tensor(
            [len(block_ids), spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim,
             torch.tensor([], dtype=spec.dtype).element_size(), *block_ids],
            dtype=torch.int64, device=self._device,
        )

    def send_kv_blocks(self, kv: KVBackend, block_ids: Sequence[int], dst: int) -> None:
        header = self._header(kv, block_ids)
        with Timer() as t:
            dist.send(torch.tensor([header.numel()], dtype=torch.int64, device=self._device), dst, group=self.group)
            dist.send(header, dst, group=self.group)
            idx = torch.tensor(list(block_ids), dtype=torch.long, device=kv.device)
            # One contiguous buffer per transfer: [layers, 2, n, block, heads, dim].
            payload = torch.stack([torch.stack([k[idx], v[idx]]) for k, v in kv.kv_caches()])
            dist.send(payload.to(self._device), dst, group=self.group)
            self._done()
        self._stats.record("send_kv_blocks", _nbytes(payload), t.seconds)

    def recv_kv_blocks(self, kv: KVBackend, block_ids: Sequence[int], src: int) -> None:
        spec = kv.spec
        with Timer() as t:
            n = torch.empty(1, dtype=torch.int64, device=self._device)
            dist.recv(n, src, group=self.group)
            header = torch.empty(int(n.item()), dtype=torch.int64, device=self._device)
            dist.recv(header, src, group=self.group)
            h = header.tolist()
            expect = [len(block_ids), spec.num_layers, spec.block_size, spec.num_kv_heads,
                      spec.head_dim, torch.tensor([], dtype=spec.dtype).element_size()]
            if h[:6] != expect:
                raise ValueError(f"KV transfer shape mismatch: sender {h[:6]}, receiver {expect}")
            payload = torch.empty(
                (spec.num_layers, 2, len(block_ids), spec.block_size, spec.num_kv_heads, spec.head_dim),
                dtype=spec.dtype, device=self._device,
            )
            dist.recv(payload, src, group=self.group)
            idx = torch.tensor(list(block_ids), dtype=torch.long, device=kv.device)
            payload = payload.to(kv.device)
            for layer, (k, v) in enumerate(kv.kv_caches()):
                k[idx] = payload[layer, 0]
                v[idx] = payload[layer, 1]
            self._done()
        self._stats.record("recv_kv_blocks", _nbytes(payload), t.seconds)

    def get_bandwidth_stats(self) -> BandwidthStats:
        return self._stats
