"""Which ranks share a host (sagellm.distributed.topology) and the launcher's torchrun variables."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from sagellm.distributed import topology as topo_mod
from sagellm.distributed.launcher import torchrun_env
from sagellm.distributed.topology import Topology, exchange, host_id


def _topo(rank: int, hosts: str, devices: tuple[int, ...]) -> Topology:
    return Topology(rank, tuple(hosts), tuple(f"name-{h}" for h in hosts), devices)


def test_ranks_per_host_and_same_host() -> None:
    t = _topo(2, "aabb", (0, 1, 0, 1))
    assert (t.world_size, t.num_hosts, t.all_on_one_host) == (4, 2, False)
    assert t.local_ranks == (2, 3) and t.local_world_size == 2
    assert t.same_host(0, 1) and not t.same_host(1, 2)
    assert t.describe() == "4 ranks on 2 host(s): name-a (2), name-b (2)"
    assert _topo(0, "aa", (0, 1)).all_on_one_host


def test_two_ranks_on_one_accelerator_are_refused_by_rank_and_host() -> None:
    t = _topo(0, "aab", (0, 0, 0))
    with pytest.raises(RuntimeError, match=r"ranks \[0, 1\] on host 'name-a' all use cuda:0"):
        t.check_devices("cuda")
    t.check_devices("cpu")  # CPU ranks may share the host's one "device"
    _topo(0, "ab", (0, 0)).check_devices("cuda")  # device 0 of two different hosts


def test_host_id_override_then_boot_id_then_hostname(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv(topo_mod.HOST_ID_ENV, " node-7 ")
    assert host_id() == "node-7"
    monkeypatch.delenv(topo_mod.HOST_ID_ENV)
    boot = tmp_path / "boot_id"
    boot.write_text("1234-abcd\n")
    monkeypatch.setattr(topo_mod, "_BOOT_ID", boot)
    assert host_id() == "boot:1234-abcd"
    monkeypatch.setattr(topo_mod, "_BOOT_ID", tmp_path / "missing")
    assert host_id() == f"host:{socket.gethostname()}"


class _OneRank:
    rank, world_size, device = 0, 1, torch.device("cpu")


def test_exchange_on_one_rank_round_trips_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(topo_mod.HOST_ID_ENV, "x")
    monkeypatch.setattr(socket, "gethostname", lambda: "h\u00e9-" + "n" * 80)  # long, non-ASCII
    t = exchange(_OneRank(), 3)  # type: ignore[arg-type]
    assert t.devices == (3,) and t.local_ranks == (0,)
    assert t.names[0].startswith("h\u00e9-n") and len(t.names[0].encode()) <= 64
    assert len(t.hosts[0]) == 32 and t.hosts == exchange(_OneRank(), 0).hosts  # type: ignore[arg-type]


_LAUNCH = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1"}


def test_torchrun_env_reads_rank_world_and_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("TORCHELASTIC_RUN_ID", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert torchrun_env() is None
    for k, v in _LAUNCH.items():
        monkeypatch.setenv(k, v)
    assert torchrun_env() == (1, 2, 0)


@pytest.mark.parametrize(("override", "match"), [
    ({"LOCAL_RANK": None}, "LOCAL_RANK not set"),
    ({"WORLD_SIZE": None}, "WORLD_SIZE not set"),
    ({"LOCAL_RANK": "one"}, "must be integers"),
    ({"RANK": "2"}, "RANK=2, WORLD_SIZE=2"),
    ({"LOCAL_RANK": "2", "WORLD_SIZE": "4"}, "0 <= LOCAL_RANK <= RANK"),
    ({"RANK": "-1"}, "0 <= LOCAL_RANK"),
])
def test_bad_launcher_variables_are_refused_by_name(monkeypatch: pytest.MonkeyPatch,
                                                    override: dict[str, str | None],
                                                    match: str) -> None:
    for k, v in {**_LAUNCH, **override}.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        torchrun_env()
