"""Which cached KV blocks to give back when the pool runs short: the policy protocol.

A cached block is *held* while a request references it and *evictable* once the last reference
drops; only evictable blocks are ever chosen. The block manager calls the hooks below; a policy
only orders blocks and never frees one. ``--kv-eviction`` picks one by name
(:data:`EvictionName`).
"""

from __future__ import annotations

import abc
from typing import Literal, get_args


class EvictionPolicy(abc.ABC):
    """The order in which evictable cached blocks leave the prefix cache."""

    def __init__(self, capacity: int) -> None:
        #: Blocks in the KV pool (policies that size queues use it).
        self.capacity = capacity

    @abc.abstractmethod
    def on_insert(self, block: int, key: bytes) -> None:
        """``block`` (content key ``key``) entered the cache; the request that computed it holds
        it. Called once per cached block, before any other hook for it."""

    @abc.abstractmethod
    def on_hit(self, block: int) -> None:
        """A request reuses cached ``block`` (held or evictable); it is held from now on."""

    @abc.abstractmethod
    def on_release(self, block: int) -> None:
        """The last reference to cached ``block`` dropped: it is evictable now."""

    @abc.abstractmethod
    def evict(self, n: int) -> list[int]:
        """Choose up to ``n`` evictable blocks and forget them (fewer only if fewer are
        evictable). The block manager frees them."""

    @abc.abstractmethod
    def remove(self, block: int) -> None:
        """Forget ``block`` (held or evictable): it left the cache some other way."""

    @property
    @abc.abstractmethod
    def num_evictable(self) -> int:
        """Evictable blocks the policy knows."""


#: The ``--kv-eviction`` choices (``EngineConfig.kv_eviction``).
EvictionName = Literal["lru", "lfu", "s3fifo"]


def make_eviction_policy(name: str, capacity: int) -> EvictionPolicy:
    """The policy called ``name`` (one of :data:`EvictionName`) for a pool of ``capacity`` blocks."""
    from sagellm.kv_cache.lfu import LFUPolicy
    from sagellm.kv_cache.lru import LRUPolicy
    from sagellm.kv_cache.s3fifo import S3FIFOPolicy

    table: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "lfu": LFUPolicy,
                                               "s3fifo": S3FIFOPolicy}
    assert set(table) == set(get_args(EvictionName))
    if name not in table:
        raise ValueError(f"unknown KV eviction policy {name!r}; choose one of "
                         f"{', '.join(get_args(EvictionName))}")
    return table[name](capacity)
