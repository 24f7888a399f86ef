"""The engine registry's health states, on a fake clock."""

from __future__ import annotations

from sagellm_server.control_plane.protocol import EngineLoad, EngineRegistration
from sagellm_server.control_plane.registry import (
    EngineHealth,
    EngineRegistry,
    RegistryPolicy,
    engine_id_for,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registration(url: str = "http://10.0.0.1:8000", models: tuple[str, ...] = ("m",),
                 interval: float = 1.0, **load: object) -> EngineRegistration:
    return EngineRegistration(url=url, models=list(models), heartbeat_interval=interval,
                              num_kv_blocks=100, block_size=16, load=EngineLoad(**load))  # type: ignore[arg-type]


def make(**policy: float) -> tuple[EngineRegistry, FakeClock]:
    clock = FakeClock()
    return EngineRegistry(RegistryPolicy(**policy), clock=clock), clock  # type: ignore[arg-type]


def test_registered_engine_is_listed_healthy_with_its_capacity() -> None:
    reg, _ = make()
    rec = reg.register(registration())
    assert rec.id == "10.0.0.1:8000"
    assert [r.id for r in reg.healthy("m")] == [rec.id]
    assert reg.healthy("other") == []
    listed = rec.as_dict(reg.clock())
    assert listed["health"] == "healthy" and listed["kv_capacity_tokens"] == 1600


def test_missed_heartbeats_mark_down_then_drop() -> None:
    reg, clock = make(missed_heartbeats=3, drop_after=10.0)
    rec = reg.register(registration(interval=1.0))
    clock.now += 2.9
    reg.sweep()
    assert rec.health is EngineHealth.HEALTHY
    clock.now += 0.2  # 3.1 s: three heartbeats missed
    assert reg.healthy("m") == []
    assert reg.engines[rec.id].health is EngineHealth.DOWN
    assert "m" in reg.models()  # still known: the model is not "unknown" while its engine is down
    clock.now += 7.0  # 10.1 s of silence
    reg.sweep()
    assert rec.id not in reg.engines
    assert reg.models() == {}


def test_a_heartbeat_brings_a_down_engine_back() -> None:
    reg, clock = make(missed_heartbeats=2, drop_after=60.0)
    rec = reg.register(registration(interval=1.0))
    clock.now += 5
    reg.sweep()
    assert rec.health is EngineHealth.DOWN
    assert reg.heartbeat(rec.id, EngineLoad(num_running=3)) is rec
    assert rec.health is EngineHealth.HEALTHY and rec.load.num_running == 3


def test_heartbeat_from_an_unknown_engine_asks_it_to_register() -> None:
    reg, _ = make()
    assert reg.heartbeat("nobody:1", EngineLoad()) is None


def test_dead_or_draining_engine_is_unhealthy_while_it_still_beats() -> None:
    reg, _ = make()
    rec = reg.register(registration())
    reg.heartbeat(rec.id, EngineLoad(alive=False))
    assert rec.health is EngineHealth.UNHEALTHY and reg.healthy("m") == []
    reg.heartbeat(rec.id, EngineLoad(draining=True))
    assert rec.health is EngineHealth.UNHEALTHY
    reg.heartbeat(rec.id, EngineLoad())
    assert rec.health is EngineHealth.HEALTHY


def test_unreachable_lasts_the_cooldown_even_through_heartbeats() -> None:
    reg, clock = make(unreachable_cooldown=5.0)
    rec = reg.register(registration())
    reg.mark_unreachable(rec.id)
    assert reg.healthy("m") == []
    clock.now += 1
    reg.heartbeat(rec.id, EngineLoad())
    assert rec.health is EngineHealth.UNREACHABLE
    clock.now += 2.5
    reg.heartbeat(rec.id, EngineLoad())
    assert rec.health is EngineHealth.UNREACHABLE
    clock.now += 1.6  # 5.1 s after: back in rotation
    assert [r.id for r in reg.healthy("m")] == [rec.id]
    reg.mark_unreachable("nobody")  # no error for an engine already gone


def test_reregistration_keeps_the_routers_counts() -> None:
    reg, _ = make()
    rec = reg.register(registration())
    rec.num_in_flight, rec.num_routed = 2, 7
    again = reg.register(registration())
    assert again is not rec and again.num_in_flight == 2 and again.num_routed == 7
    assert len(reg.engines) == 1
    assert reg.deregister(rec.id) and not reg.deregister(rec.id)


def test_outstanding_work_counts_reported_load_that_is_not_the_routers() -> None:
    reg, _ = make()
    rec = reg.register(registration())
    rec.num_in_flight = 4
    # The engine reports 10 outstanding, 4 of them ours: 6 came from elsewhere.
    reg.heartbeat(rec.id, EngineLoad(num_running=8, num_waiting=2, num_in_flight=10))
    assert rec.num_outstanding == 4 + 6
    rec.num_in_flight = 1  # three of ours finished since: live count, same external load
    assert rec.num_outstanding == 1 + 6


def test_engine_ids_are_readable_and_stable() -> None:
    assert engine_id_for("http://10.1.2.3:8000") == "10.1.2.3:8000"
    assert engine_id_for("https://gpu-0.example/sagellm/a") == "gpu-0.example_sagellm_a"


def test_registration_validation() -> None:
    import pytest
    from pydantic import ValidationError

    for bad in ({"url": "ftp://host:1"}, {"url": "http://host:1?x=1"}, {"models": []},
                {"models": [""]}, {"heartbeat_interval": 0}):
        kwargs = {"url": "http://host:1", "models": ["m"], "heartbeat_interval": 1.0, **bad}
        with pytest.raises(ValidationError):
            EngineRegistration(**kwargs)  # type: ignore[arg-type]
    assert EngineRegistration(url="http://host:1/", models=["m"], heartbeat_interval=1).url == "http://host:1"
