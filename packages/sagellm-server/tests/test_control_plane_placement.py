"""Placement: least outstanding work, prefix affinity by rendezvous hashing, overload spill."""

from __future__ import annotations

import random
from collections import Counter

from sagellm_server.control_plane.placement import Placement, PlacementPolicy
from sagellm_server.control_plane.protocol import EngineRegistration
from sagellm_server.control_plane.registry import EngineRecord


def engine(i: int, in_flight: int = 0, max_num_seqs: int = 8) -> EngineRecord:
    info = EngineRegistration(url=f"http://e{i}:8000", models=["m"], heartbeat_interval=1,
                              max_num_seqs=max_num_seqs)
    rec = EngineRecord(f"e{i}", info, registered_at=0, last_heartbeat=0, load=info.load)
    rec.num_in_flight = in_flight
    return rec


def policy(**kw: object) -> PlacementPolicy:
    return PlacementPolicy(rng=random.Random(0), **kw)  # type: ignore[arg-type]


def test_least_loaded_without_a_key() -> None:
    engines = [engine(0, 3), engine(1, 1), engine(2, 2)]
    chosen, how = policy().choose(engines, None)
    assert chosen.id == "e1" and how is Placement.LEAST_LOADED


def test_least_loaded_ties_are_spread() -> None:
    engines = [engine(i) for i in range(3)]
    p = policy()
    picks = Counter(p.choose(engines, None)[0].id for _ in range(300))
    assert set(picks) == {"e0", "e1", "e2"} and min(picks.values()) > 60


def test_load_is_per_batch_slot() -> None:
    big, small = engine(0, in_flight=6, max_num_seqs=64), engine(1, in_flight=2, max_num_seqs=4)
    assert policy().choose([big, small], None)[0].id == "e0"


def test_same_key_same_engine_and_keys_spread() -> None:
    p = policy()
    engines = [engine(i) for i in range(4)]
    keys = [p.affinity_key("m", {"prompt": f"system prompt {i} " * 20}) for i in range(200)]
    first = [p.choose(engines, k)[0].id for k in keys]
    assert [p.choose(engines, k)[0].id for k in keys] == first
    assert all(p.choose(engines, k)[1] is Placement.AFFINITY for k in keys)
    spread = Counter(first)
    assert len(spread) == 4 and min(spread.values()) > 25


def test_an_engine_leaving_moves_only_its_keys() -> None:
    p = policy()
    engines = [engine(i) for i in range(4)]
    keys = [p.affinity_key("m", {"prompt": f"doc {i}"}) for i in range(300)]
    before = {k: p.choose(engines, k)[0].id for k in keys}
    after = {k: p.choose(engines[:3], k)[0].id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "e3" for k in moved)


def test_overloaded_affine_engine_spills_to_least_loaded() -> None:
    p = policy(overload_factor=2.0, overload_slack=4)
    engines = [engine(i) for i in range(3)]
    key = p.affinity_key("m", {"prompt": "shared prefix"})
    affine = p.choose(engines, key)[0]
    affine.num_in_flight = 4  # 4/8 <= 2 * 0 + 4/8: still within the slack
    assert p.choose(engines, key) == (affine, Placement.AFFINITY)
    affine.num_in_flight = 5
    chosen, how = p.choose(engines, key)
    assert how is Placement.SPILL and chosen is not affine
    for e in engines:
        if e is not affine:
            e.num_in_flight = 3  # 5/8 <= 2 * 3/8 + 4/8: affine again
    assert p.choose(engines, key) == (affine, Placement.AFFINITY)


def test_affinity_keys() -> None:
    p = policy(prefix_chars=8, prefix_tokens=3)
    k = p.affinity_key
    assert k("m", {"prompt": "abcdefgh-1"}) == k("m", {"prompt": "abcdefgh-2"})
    assert k("m", {"prompt": "abcdefgh"}) != k("other", {"prompt": "abcdefgh"})
    assert k("m", {"prompt": ["abcdefgh-1", "zzz"]}) == k("m", {"prompt": "abcdefgh-9"})
    assert k("m", {"prompt": [1, 2, 3, 4]}) == k("m", {"prompt": [1, 2, 3, 9]})
    assert k("m", {"prompt": [[1, 2, 3, 4]]}) == k("m", {"prompt": [1, 2, 3]})
    assert k("m", {"prompt": [1, 2, 3]}) != k("m", {"prompt": [1, 2, 4]})
    sys = {"role": "system", "content": "You are terse."}
    assert k("m", {"messages": [sys, {"role": "user", "content": "a"}]}) == \
        k("m", {"messages": [sys, {"role": "user", "content": "b"}]})
    parts = {"role": "system", "content": [{"type": "text", "text": "You are terse."}]}
    assert k("m", {"messages": [parts]}) == k("m", {"messages": [sys]})
    for nothing in ({}, {"prompt": ""}, {"prompt": []}, {"messages": []}, {"messages": "x"},
                    {"prompt": 5}, {"messages": [1]}):
        assert k("m", nothing) is None, nothing
    assert policy(prefix_chars=0).affinity_key("m", {"prompt": "abc"}) is None
