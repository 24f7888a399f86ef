"""The tensor-parallel group a model is built for."""

from __future__ import annotations

from dataclasses import dataclass

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


SINGLE = TPGroup()
