"""Which engines exist, what they serve, and whether they are up: the control plane's registry.

An engine is *healthy* while its heartbeats arrive and it says it serves; *unhealthy* while its
heartbeats arrive but it does not (its engine is dead or restarting, or it is draining);
*unreachable* for a short cool-down after the router failed to connect to it; *down* once it has
missed ``missed_heartbeats`` heartbeats, and it is dropped from the registry once no heartbeat
came for ``drop_after`` seconds. State is computed from a clock (injected, so tests use a fake
one) whenever the registry is read, so it never lags a sweep.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from sagellm_server.control_plane.protocol import EngineLoad, EngineRegistration

logger = logging.getLogger("sagellm.control_plane")


class EngineHealth(str, enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNREACHABLE = "unreachable"
    DOWN = "down"


@dataclass
class EngineRecord:
    id: str
    info: EngineRegistration
    registered_at: float
    last_heartbeat: float
    load: EngineLoad
    #: Requests the router has sent to this engine that have not finished (live, not reported).
    num_in_flight: int = 0
    #: ``num_in_flight`` when the last heartbeat arrived: what of the reported load was ours.
    in_flight_at_heartbeat: int = 0
    unreachable_until: float = 0.0
    health: EngineHealth = EngineHealth.HEALTHY
    num_routed: int = 0

    @property
    def num_outstanding(self) -> int:
        """Outstanding work: the router's live in-flight count plus the reported load that is not
        the router's (requests sent to the engine directly, or by another router)."""
        external = max(0, self.load.num_outstanding - self.in_flight_at_heartbeat)
        return self.num_in_flight + external

    def serves(self, model: str) -> bool:
        return model in self.info.models

    def as_dict(self, now: float) -> dict[str, object]:
        info = self.info
        return {
            "id": self.id, "url": info.url, "models": list(info.models), "health": self.health.value,
            "backend": info.backend, "device": info.device, "max_model_len": info.max_model_len,
            "num_kv_blocks": info.num_kv_blocks, "block_size": info.block_size,
            "kv_capacity_tokens": info.kv_capacity_tokens, "max_num_seqs": info.max_num_seqs,
            "version": info.version, "heartbeat_interval": info.heartbeat_interval,
            "seconds_since_heartbeat": round(now - self.last_heartbeat, 3),
            "load": {**self.load.model_dump(), "num_router_in_flight": self.num_in_flight,
                     "num_outstanding": self.num_outstanding},
            "num_routed": self.num_routed,
        }


def engine_id_for(url: str) -> str:
    """A readable id that stays the same when the engine (or the control plane) restarts."""
    parts = urlsplit(url)
    path = parts.path.strip("/").replace("/", "_")
    return f"{parts.netloc}_{path}" if path else parts.netloc


@dataclass
class RegistryPolicy:
    #: Heartbeats an engine may miss before it counts as down.
    missed_heartbeats: int = 3
    #: Seconds without a heartbeat after which an engine is dropped from the registry.
    drop_after: float = 30.0
    #: Seconds an engine stays out of rotation after the router failed to connect to it.
    unreachable_cooldown: float = 5.0


@dataclass
class EngineRegistry:
    policy: RegistryPolicy = field(default_factory=RegistryPolicy)
    clock: Callable[[], float] = time.monotonic
    engines: dict[str, EngineRecord] = field(default_factory=dict)

    # -- what engines do -------------------------------------------------------------------

    def register(self, info: EngineRegistration) -> EngineRecord:
        """Add an engine, or refresh it (same URL: a restarted engine keeps its id and counts)."""
        now = self.clock()
        eid = engine_id_for(info.url)
        old = self.engines.get(eid)
        rec = EngineRecord(eid, info, registered_at=now, last_heartbeat=now, load=info.load)
        if old is not None:
            rec.num_in_flight, rec.num_routed = old.num_in_flight, old.num_routed
        rec.in_flight_at_heartbeat = rec.num_in_flight
        self.engines[eid] = rec
        self._update(rec, now)
        logger.info("engine %s registered: %s serving %s (%s, %s, context %d, KV %d tokens)",
                    eid, info.url, ", ".join(info.models), info.backend or "?", info.device or "?",
                    info.max_model_len, info.kv_capacity_tokens)
        return rec

    def heartbeat(self, eid: str, load: EngineLoad) -> EngineRecord | None:
        """Record a heartbeat; None if the engine is not registered (it should register again)."""
        rec = self.engines.get(eid)
        if rec is None:
            return None
        rec.last_heartbeat = self.clock()
        rec.load = load
        rec.in_flight_at_heartbeat = rec.num_in_flight
        self._update(rec, rec.last_heartbeat)
        return rec

    def deregister(self, eid: str) -> bool:
        rec = self.engines.pop(eid, None)
        if rec is not None:
            logger.info("engine %s deregistered", eid)
        return rec is not None

    # -- what the router does --------------------------------------------------------------

    def mark_unreachable(self, eid: str) -> None:
        rec = self.engines.get(eid)
        if rec is not None:
            rec.unreachable_until = self.clock() + self.policy.unreachable_cooldown
            self._update(rec, self.clock())

    def sweep(self) -> None:
        """Bring every engine's health up to the clock and drop the long-silent ones."""
        now = self.clock()
        for eid, rec in list(self.engines.items()):
            if now - rec.last_heartbeat > self.policy.drop_after:
                del self.engines[eid]
                logger.warning("engine %s dropped: no heartbeat for %.1f s", eid, now - rec.last_heartbeat)
            else:
                self._update(rec, now)

    def records(self) -> Iterator[EngineRecord]:
        self.sweep()
        return iter(sorted(self.engines.values(), key=lambda r: r.id))

    def healthy(self, model: str) -> list[EngineRecord]:
        return [r for r in self.records() if r.health is EngineHealth.HEALTHY and r.serves(model)]

    def models(self) -> dict[str, list[EngineRecord]]:
        """Every model any registered engine serves (healthy or not), with its engines."""
        out: dict[str, list[EngineRecord]] = {}
        for rec in self.records():
            for name in rec.info.models:
                out.setdefault(name, []).append(rec)
        return out

    def _update(self, rec: EngineRecord, now: float) -> None:
        silent = now - rec.last_heartbeat
        if silent > self.policy.missed_heartbeats * rec.info.heartbeat_interval:
            health = EngineHealth.DOWN
        elif now < rec.unreachable_until:
            health = EngineHealth.UNREACHABLE
        elif not rec.load.alive or rec.load.draining:
            health = EngineHealth.UNHEALTHY
        else:
            health = EngineHealth.HEALTHY
        if health is not rec.health:
            log = logger.info if health is EngineHealth.HEALTHY else logger.warning
            log("engine %s is %s (was %s; last heartbeat %.1f s ago)", rec.id, health.value,
                rec.health.value, silent)
            rec.health = health
