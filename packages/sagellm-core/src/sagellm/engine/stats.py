"""The engine's numbers, one dataclass for every reader: ``LLMEngine.get_stats``, the server's
snapshot and metrics, and the wire between an engine process and its server.

On the wire the stats travel as a JSON object keyed by field name (:meth:`EngineStats.to_wire`),
never as a positional list, so adding a field cannot shift the others' meaning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

_S = TypeVar("_S", bound="EngineStats")


@dataclass(frozen=True)
class EngineStats:
    """Load gauges (now) and counters (since the engine started); all zero before its first step."""

    num_running: int = 0
    num_waiting: int = 0
    #: Fraction of KV blocks in use (0..1).
    kv_usage: float = 0.0
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    #: Fraction of allocated KV slots that hold no token (the unfilled tails of blocks).
    kv_fragmentation: float = 0.0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    #: Prompt tokens looked up in the prefix cache and those found there (tokens).
    num_prefix_cache_queries: int = 0
    num_prefix_cache_hits: int = 0
    #: Cached KV blocks given back to make room (the eviction policy's choices and what hung
    #: below them in the prefix tree).
    num_kv_evictions: int = 0

    #: The fields that only grow: the server adds those of engines before a restart to them.
    COUNTERS: ClassVar[tuple[str, ...]] = ("num_prompt_tokens", "num_generation_tokens",
                                           "num_preemptions", "num_steps",
                                           "num_prefix_cache_queries", "num_prefix_cache_hits",
                                           "num_kv_evictions")

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens found in the prefix cache over those looked up (0 before any)."""
        q = self.num_prefix_cache_queries
        return self.num_prefix_cache_hits / q if q else 0.0

    def to_wire(self) -> dict[str, int | float]:
        """The stats fields by name (those of a subclass are left out: they are not the engine's)."""
        return {f.name: getattr(self, f.name) for f in _FIELDS}

    @classmethod
    def from_wire(cls: type[_S], data: Mapping[str, Any], **extra: Any) -> _S:
        """Stats from :meth:`to_wire`'s form, plus a subclass's own fields in ``extra``.

        Names this version does not know are ignored (an engine newer than its server may send
        more), and missing ones keep their defaults (an older engine sends fewer), so the two
        sides of the wire need not be upgraded together.
        """
        known = {name: data[name] for name in _NAMES if name in data}
        return cls(**known, **extra)


_FIELDS = dataclasses.fields(EngineStats)
_NAMES = tuple(f.name for f in _FIELDS)
