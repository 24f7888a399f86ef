"""Linear layers that know how they are split across tensor-parallel ranks.

Each parameter carries a ``weight_loader(param, loaded, shard_id)`` that copies this rank's part of
a full checkpoint tensor, so loaders stay unaware of parallelism.

Every matrix product goes through one method, ``matmul(x, bias)``: a weight-only quantized linear
(:mod:`sagellm.layers.quant_linear`) overrides that method only, so sharding, the all-reduce and
the bias order stay written once, here.
"""

from __future__ import annotations

import torch
from torch import nn

from sagellm.layers.parallel import SINGLE, TPGroup


def _param(shape: tuple[int, ...], loader) -> nn.Parameter:  # type: ignore[no-untyped-def]
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


class ColumnParallelLinear(nn.Module):
    """``y = x W^T (+ b)`` with ``W``'s output rows split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.out_per_rank = tp.shard(out_features, "output features")
        self.weight = _param((self.out_per_rank, in_features), self._load)
        self.bias = _param((self.out_per_rank,), self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * n, n))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T (+ bias)`` on this rank's weight."""
        return nn.functional.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused in one matrix (gate and up, say)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 tp: TPGroup = SINGLE) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        per_rank = [s // self.tp.size for s in self.out_sizes]
        offset = sum(per_rank[:shard_id])
        n = per_rank[shard_id]
        param.data.narrow(0, offset, n).copy_(loaded.narrow(0, self.tp.rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused query, key and value projections; heads split across ranks.

    With fewer key/value heads than ranks each KV head is replicated on ``size / num_kv_heads``
    ranks.
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TPGroup = SINGLE) -> None:
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "attention heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads = tp.shard(num_kv_heads, "key/value heads")
            self.kv_head_start = tp.rank * self.num_kv_heads
        else:
            if tp.size % num_kv_heads:
                raise ValueError(f"tensor_parallel_size ({tp.size}) must be a multiple of the "
                                 f"key/value heads ({num_kv_heads}) when it exceeds them")
            self.num_kv_heads = 1
            self.kv_head_start = tp.rank * num_kv_heads // tp.size
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        nn.Module.__init__(self)
        self.tp = tp
        self.out_per_rank = out
        self.weight = _param((out, hidden), self._load)
        self.bias = _param((out,), self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        d = self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            dst, src = param.data.narrow(0, 0, q), loaded.narrow(0, self.tp.rank * q, q)
        else:
            off = q if shard_id == "k" else q + kv
            dst, src = param.data.narrow(0, off, kv), loaded.narrow(0, self.kv_head_start * d, kv)
        dst.copy_(src)


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with ``W``'s input columns split; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.in_per_rank = tp.shard(in_features, "input features")
        self.weight = _param((out_features, self.in_per_rank), self._load)
        self.bias = _param((out_features,), self._load_bias) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        n = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * n, n))

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(loaded)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T (+ bias)`` on this rank's weight (``forward`` passes no bias: it is added
        after the all-reduce)."""
        return nn.functional.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, None)
        if self.tp.size > 1:
            assert self.tp.comm is not None
            y = self.tp.comm.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks."""

    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        self.end = min(vocab_size, self.start + self.per_rank)
        self.weight = _param((self.per_rank, hidden), self._load)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        part = loaded[self.start:self.end]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        mask = (ids >= self.start) & (ids < self.end)
        local = torch.where(mask, ids - self.start, 0)
        y = nn.functional.embedding(local, self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        assert self.tp.comm is not None
        return self.tp.comm.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection over a split vocabulary; logits gathered from all ranks."""

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T`` on this rank's vocabulary rows (the head has no bias)."""
        return nn.functional.linear(x, self.weight, bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        y = self.matmul(hidden, None)
        if self.tp.size > 1:
            assert self.tp.comm is not None
            y = self.tp.comm.all_gather(y, dim=-1)
        return y[..., : self.vocab_size]
