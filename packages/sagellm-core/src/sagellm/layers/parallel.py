"""The tensor-parallel group a model is built for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sagellm.protocols import CommBackend


@dataclass(frozen=True)
class TPGroup:
    """Rank and size of the tensor-parallel group; ``comm`` is ``None`` for a single rank."""

    rank: int = 0
    size: int = 1
    comm: CommBackend | None = None

    def shard(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({self.size})")
        return n // self.size

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` over the group's ranks (collective; ``value`` for one rank)."""
        if self.comm is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm.device)
        return int(self.comm.all_gather(t, dim=0).min().item())


SINGLE = TPGroup()
