"""Shared base for accelerators whose torch module mirrors CUDA's (``torch.npu``,
``torch.mlu``, ...): device selection, memory queries and peak-memory counters are the same calls
on ``torch.<device_type>``, so a vendor platform only says what differs.

It also carries the test-only CPU emulation switch that vendor packages use in CI: with the
class's ``emulate_env`` variable set to ``cpu``, the platform places everything on the CPU (and
reports it loudly). Unset, nothing changes.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.protocols import Availability, Capabilities, MemoryInfo, Platform


def emulation_mode(env: str) -> str | None:
    """``"cpu"`` when the test-only emulation named by ``env`` is on, ``None`` when off.

    Raises ``ValueError`` for any other value, so a typo never silently runs the real path.
    """
    raw = os.environ.get(env, "").strip()
    if not raw:
        return None
    if raw != "cpu":
        raise ValueError(f"{env}={raw!r} is not understood; the only (test-only) value is 'cpu'")
    return raw


@dataclass(frozen=True)
class Probe:
    """The outcome of looking for a vendor library and its devices."""

    ok: bool
    reason: str
    module: ModuleType | None = None


class TorchAcceleratorPlatform(Platform):
    #: Test-only environment variable that maps the device onto the CPU when set to ``cpu``.
    emulate_env: ClassVar[str | None] = None
    #: Human name used in messages ("Ascend", "MLU").
    vendor_name: ClassVar[str] = "accelerator"

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> Probe:
        """Look for the vendor library and a device; every failure becomes a reason, never an
        exception. Called by :meth:`is_available` outside emulation."""

    @classmethod
    @abc.abstractmethod
    def device_capabilities(cls) -> Capabilities:
        """Capabilities on the real device (emulation has its own)."""

    @classmethod
    def is_available(cls) -> Availability:
        if cls.emulate_env:
            try:
                mode = emulation_mode(cls.emulate_env)
            except ValueError as exc:
                return Availability.no(str(exc))
            if mode == "cpu":
                return Availability.yes(f"EMULATED on the CPU ({cls.emulate_env}=cpu, test-only): "
                                        f"no {cls.vendor_name} code runs")
        found = cls.probe()
        return Availability(found.ok, found.reason)

    @classmethod
    def capabilities(cls) -> Capabilities:
        if cls.emulated():
            # Never picked by ``auto``; gloo, since the "device" is the CPU.
            return Capabilities(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                                default_dtype=torch.float32, dist_backend="gloo", priority=-1)
        return cls.device_capabilities()

    @classmethod
    def emulated(cls) -> bool:
        if not cls.emulate_env:
            return False
        try:
            return emulation_mode(cls.emulate_env) == "cpu"
        except ValueError:
            return False

    def _torch_module(self) -> ModuleType:
        return getattr(torch, self.device_type)  # type: ignore[no-any-return]

    @property
    def device(self) -> torch.device:
        if self.emulated():
            return torch.device("cpu")
        return torch.device(self.device_type, self.device_index)

    def set_device(self) -> None:
        if not self.emulated():
            self._torch_module().set_device(self.device_index)

    def memory_info(self) -> MemoryInfo:
        if self.emulated():
            return CpuPlatform().memory_info()
        free, total = self._torch_module().mem_get_info(self.device_index)
        return MemoryInfo(free_bytes=int(free), total_bytes=int(total))

    def synchronize(self) -> None:
        if not self.emulated():
            self._torch_module().synchronize(self.device_index)

    def max_memory_allocated(self) -> int:
        if self.emulated():
            return 0
        return int(self._torch_module().max_memory_allocated(self.device_index))

    def reset_peak_memory(self) -> None:
        if not self.emulated():
            self._torch_module().reset_peak_memory_stats(self.device_index)

    def device_name(self) -> str:
        if self.emulated():
            return f"cpu ({self.vendor_name} emulation, test-only)"
        return str(self._torch_module().get_device_name(self.device_index))
