"""Which engine gets a request: prefix affinity by rendezvous hashing, bounded by load.

A request's *affinity key* is the start of its prompt (the first ``prefix_chars`` characters of
a text prompt, or of the chat messages as role and content in order; the first
``prefix_tokens`` ids of a token prompt). Every engine gets a score ``sha256(key, engine id)``
and the highest wins (rendezvous hashing): requests that share the key meet the same engine and
its prefix cache, and when an engine joins or leaves only the keys it wins move. The affine
engine is passed over when it is *overloaded*: its outstanding work exceeds
``overload_factor`` times the least-loaded engine's plus ``overload_slack`` requests (both
normalised by the engines' batch sizes); the request then goes to the least-loaded engine.
Requests without a key (or an empty prompt) go to the least-loaded engine; ties are broken at
random so that idle engines share the work.
"""

from __future__ import annotations

import enum
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sagellm_server.control_plane.registry import EngineRecord


class Placement(str, enum.Enum):
    """How an engine was chosen (counted in the router's metrics)."""

    AFFINITY = "affinity"       # the affine engine, not overloaded
    SPILL = "spill"             # the affine engine was overloaded: the least-loaded one instead
    LEAST_LOADED = "least_loaded"  # no affinity key


@dataclass
class PlacementPolicy:
    prefix_chars: int = 256
    prefix_tokens: int = 64
    overload_factor: float = 2.0
    overload_slack: int = 4
    rng: random.Random = field(default_factory=random.Random)

    def affinity_key(self, model: str, body: dict[str, Any]) -> bytes | None:
        """The bytes that requests meant to share an engine have in common, or None."""
        start: Any = None
        prompt = body.get("prompt")
        messages = body.get("messages")
        if prompt is not None:
            first = prompt[0] if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else prompt
            if isinstance(first, str):
                start = first[: self.prefix_chars]
            elif isinstance(first, list):
                start = first[: self.prefix_tokens]
        elif isinstance(messages, list):
            start = _messages_prefix(messages, self.prefix_chars)
        if not start:
            return None
        return json.dumps([model, start], ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")

    def choose(self, engines: Sequence[EngineRecord], key: bytes | None) -> tuple[EngineRecord, Placement]:
        """The engine for a request with affinity ``key`` among ``engines`` (not empty)."""
        assert engines, "choose() needs at least one engine"
        least = self._least_loaded(engines)
        if key is None:
            return least, Placement.LEAST_LOADED
        affine = max(engines, key=lambda e: _rendezvous(key, e.id))
        if _load(affine) > self.overload_factor * _load(least) + self.overload_slack / _size(affine):
            return least, Placement.SPILL
        return affine, Placement.AFFINITY

    def _least_loaded(self, engines: Sequence[EngineRecord]) -> EngineRecord:
        lowest = min(_load(e) for e in engines)
        return self.rng.choice([e for e in engines if _load(e) == lowest])


def _size(e: EngineRecord) -> int:
    return max(1, e.info.max_num_seqs)


def _load(e: EngineRecord) -> float:
    """Outstanding work per batch slot: engines of different sizes compare fairly."""
    return e.num_outstanding / _size(e)


def _rendezvous(key: bytes, engine_id: str) -> bytes:
    return hashlib.sha256(key + b"\0" + engine_id.encode()).digest()


def _messages_prefix(messages: list[Any], limit: int) -> str:
    parts: list[str] = []
    size = 0
    for m in messages:
        if not isinstance(m, dict):
            break
        content = m.get("content")
        if isinstance(content, list):  # content parts: their text, in order
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict)
                              and isinstance(p.get("text"), str))
        if not isinstance(content, str):
            content = ""
        piece = f"{m.get('role')}\x1f{content}\x1e"
        parts.append(piece)
        size += len(piece)
        if size >= limit:
            break
    return "".join(parts)[:limit]
