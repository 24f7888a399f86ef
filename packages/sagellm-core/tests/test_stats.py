"""EngineStats: the one stats schema, and its keyed wire form."""

from __future__ import annotations

import dataclasses
import json

from sagellm.engine.llm_engine import EngineStats as ReExported
from sagellm.engine.stats import EngineStats

FULL = EngineStats(num_running=2, num_waiting=1, kv_usage=0.25, num_kv_blocks=8,
                   num_free_kv_blocks=6, kv_fragmentation=0.5, num_prompt_tokens=30,
                   num_generation_tokens=7, num_preemptions=1, num_steps=9)


def test_the_wire_form_is_keyed_by_field_name_and_round_trips_through_json() -> None:
    wire = FULL.to_wire()
    assert list(wire) == [f.name for f in dataclasses.fields(EngineStats)]
    assert EngineStats.from_wire(json.loads(json.dumps(wire))) == FULL
    assert ReExported is EngineStats  # still importable where it was


def test_unknown_names_are_ignored_and_missing_ones_take_their_defaults() -> None:
    newer = {**FULL.to_wire(), "num_swapped": 3}  # an engine newer than its server
    assert EngineStats.from_wire(newer) == FULL
    older = {"num_running": 2, "num_steps": 9}  # an engine older than its server
    assert EngineStats.from_wire(older) == EngineStats(num_running=2, num_steps=9)
    assert EngineStats.from_wire({}) == EngineStats()


@dataclasses.dataclass(frozen=True)
class _Held(EngineStats):
    alive: bool = True


def test_a_subclass_adds_its_own_fields_beside_the_wire_ones_not_on_the_wire() -> None:
    held = _Held.from_wire({**FULL.to_wire(), "alive": True}, alive=False)
    assert held.alive is False and held.num_steps == 9  # "alive" on the wire is not the engine's
    assert "alive" not in held.to_wire() and held.to_wire() == FULL.to_wire()
    assert set(EngineStats.COUNTERS) <= set(FULL.to_wire())
