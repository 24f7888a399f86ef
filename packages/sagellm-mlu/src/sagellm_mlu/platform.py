"""The Cambricon MLU platform: device ``mlu`` through torch_mlu, CNCL for communication."""

from __future__ import annotations

import torch
from sagellm.backends.cpu import CpuPlatform
from sagellm.protocols import Availability, Capabilities, KVCacheSpec, MemoryInfo, Platform

from sagellm_mlu import _vendor
from sagellm_mlu.attention import MluAttentionBackend
from sagellm_mlu.comm import MluComm
from sagellm_mlu.kv import MluKVBackend


def _emulated() -> bool:
    try:
        return _vendor.emulation_mode() == "cpu"
    except ValueError:
        return False


class MluPlatform(Platform):
    """Cambricon MLUs (MLU370, MLU590 and later) through torch_mlu.

    Under the test-only ``SAGELLM_MLU_EMULATE=cpu`` the device is the CPU, communication is
    gloo and the fused ops are CPU models; ``auto`` never picks an emulated platform.
    """

    name = "mlu"
    device_type = "mlu"

    @classmethod
    def is_available(cls) -> Availability:
        try:
            mode = _vendor.emulation_mode()
        except ValueError as exc:
            return Availability.no(str(exc))
        if mode == "cpu":
            return Availability.yes(f"EMULATED on the CPU ({_vendor.EMULATE_ENV}=cpu, test-only): "
                                    f"no Cambricon code runs")
        probe = _vendor.probe_torch_mlu()
        return Availability(probe.ok, probe.reason)

    @classmethod
    def capabilities(cls) -> Capabilities:
        if _emulated():
            return Capabilities(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                                default_dtype=torch.float32, dist_backend="gloo", priority=-1)
        # float16 runs on every MLU generation; pass --dtype bfloat16 where the chip supports it.
        return Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            default_dtype=torch.float16, supports_graphs=False,
                            dist_backend="cncl", priority=100)

    @property
    def device(self) -> torch.device:
        if _emulated():
            return torch.device("cpu")
        return torch.device("mlu", self.device_index)

    def set_device(self) -> None:
        if not _emulated():
            torch.mlu.set_device(self.device_index)  # type: ignore[attr-defined]

    def memory_info(self) -> MemoryInfo:
        if _emulated():
            return CpuPlatform().memory_info()
        free, total = torch.mlu.mem_get_info(self.device_index)  # type: ignore[attr-defined]
        return MemoryInfo(free_bytes=int(free), total_bytes=int(total))

    def synchronize(self) -> None:
        if not _emulated():
            torch.mlu.synchronize(self.device_index)  # type: ignore[attr-defined]

    def max_memory_allocated(self) -> int:
        if _emulated():
            return 0
        return int(torch.mlu.max_memory_allocated(self.device_index))  # type: ignore[attr-defined]

    def reset_peak_memory(self) -> None:
        if not _emulated():
            torch.mlu.reset_peak_memory_stats(self.device_index)  # type: ignore[attr-defined]

    def device_name(self) -> str:
        if _emulated():
            return "cpu (MLU emulation, test-only)"
        return str(torch.mlu.get_device_name(self.device_index))  # type: ignore[attr-defined]

    def make_kv_backend(self, spec: KVCacheSpec, num_blocks: int) -> MluKVBackend:
        return MluKVBackend(spec, num_blocks, self.device)

    def make_attention_backend(self) -> MluAttentionBackend:
        return MluAttentionBackend(_vendor.load_ops())

    def make_comm_backend(self, rank: int, world_size: int) -> MluComm:
        return MluComm(self.device)
