"""Which ranks share a host: the fact that multi-node code must ask for instead of assuming.

Right after the process group is up, every rank contributes its host id, host name and device
index (:func:`exchange`, one ``all_gather`` of int64s through the ``CommBackend``: nothing is
pickled). The :class:`Topology` that comes back is the same on every rank. It answers:

* how many ranks share this host (:attr:`Topology.local_world_size`), which is what a CPU rank
  divides the host's cores by (not the world size: under ``torchrun`` across nodes each node has
  its own cores);
* whether two ranks share a host (:meth:`Topology.same_host`, :attr:`Topology.all_on_one_host`):
  a transport that only works inside one machine (peer-to-peer device memory, NVLink, shared
  memory files) must check this before it is chosen;
* whether two ranks on one host were given the same accelerator (:meth:`Topology.check_devices`),
  the symptom of a launcher that set ``LOCAL_RANK`` wrongly.

The host id is ``SAGELLM_HOST_ID`` if set, else the kernel's boot id (shared by containers on one
machine, which can reach each other's devices; different on every machine and VM), else the host
name. Setting ``SAGELLM_HOST_ID`` per process is how the CPU tests run two "nodes" on one machine.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from sagellm.protocols import CommBackend

HOST_ID_ENV = "SAGELLM_HOST_ID"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_DIGEST_BYTES = 16
_NAME_BYTES = 64


def host_id() -> str:
    """This machine's identity for same-host decisions (see the module docstring)."""
    override = os.environ.get(HOST_ID_ENV, "").strip()
    if override:
        return override
    try:
        boot = _BOOT_ID.read_text().strip()
    except OSError:
        boot = ""
    return f"boot:{boot}" if boot else f"host:{socket.gethostname()}"


@dataclass(frozen=True)
class Topology:
    """Per rank: host id digest, host name and device index; ``rank`` is this process's rank."""

    rank: int
    hosts: tuple[str, ...]
    names: tuple[str, ...]
    devices: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.hosts)

    @property
    def num_hosts(self) -> int:
        return len(set(self.hosts))

    @property
    def all_on_one_host(self) -> bool:
        return self.num_hosts == 1

    def same_host(self, a: int, b: int) -> bool:
        return self.hosts[a] == self.hosts[b]

    @property
    def local_ranks(self) -> tuple[int, ...]:
        """The ranks on this rank's host, this one included, in rank order."""
        return tuple(r for r in range(self.world_size) if self.same_host(r, self.rank))

    @property
    def local_world_size(self) -> int:
        return len(self.local_ranks)

    def check_devices(self, device_type: str) -> None:
        """Refuse two ranks on one host driving the same accelerator (CPU ranks may share)."""
        if device_type == "cpu":
            return
        seen = Counter(zip(self.hosts, self.devices))
        for (host, device), n in seen.items():
            if n > 1:
                ranks = [r for r in range(self.world_size)
                         if (self.hosts[r], self.devices[r]) == (host, device)]
                name = self.names[ranks[0]]
                raise RuntimeError(
                    f"ranks {ranks} on host {name!r} all use {device_type}:{device}: each rank on "
                    f"a host needs its own device (is LOCAL_RANK set per process? torchrun sets it)")

    def describe(self) -> str:
        per_host = Counter(self.hosts)
        first = {h: self.names[self.hosts.index(h)] for h in per_host}
        parts = [f"{first[h]} ({n})" for h, n in per_host.items()]
        return f"{self.world_size} ranks on {self.num_hosts} host(s): {', '.join(parts)}"


def _encode(text: str, size: int) -> list[int]:
    raw = text.encode()[:size]
    return list(raw) + [0] * (size - len(raw))


def _decode(values: list[int]) -> str:
    return bytes(v for v in values if v).decode(errors="replace")


def exchange(comm: CommBackend, device_index: int) -> Topology:
    """Collective: every rank calls it once, at the same point (after the group is up)."""
    digest = hashlib.sha256(host_id().encode()).hexdigest()[:2 * _DIGEST_BYTES]
    row = _encode(digest, 2 * _DIGEST_BYTES) + _encode(socket.gethostname(), _NAME_BYTES)
    row.append(device_index)
    local = torch.tensor([row], dtype=torch.int64, device=comm.device)
    rows = comm.all_gather(local, dim=0).cpu().tolist() if comm.world_size > 1 else [row]
    cut = 2 * _DIGEST_BYTES
    return Topology(
        rank=comm.rank,
        hosts=tuple(_decode(r[:cut]) for r in rows),
        names=tuple(_decode(r[cut:cut + _NAME_BYTES]) for r in rows),
        devices=tuple(int(r[-1]) for r in rows),
    )
