"""The Ascend platform: device ``npu`` through torch_npu, HCCL for communication."""

from __future__ import annotations

import torch

from sagellm.backends.accelerator import Probe, TorchAcceleratorPlatform
from sagellm.protocols import Capabilities, KVCacheSpec
from sagellm_ascend import _vendor
from sagellm_ascend.attention import AscendAttentionBackend
from sagellm_ascend.comm import AscendComm
from sagellm_ascend.kv import AscendKVBackend


class AscendPlatform(TorchAcceleratorPlatform):
    """Huawei Ascend NPUs (Atlas A2/A3 and later) through torch_npu.

    Under the test-only ``SAGELLM_ASCEND_EMULATE=cpu`` the device is the CPU, communication is
    gloo and the fused ops are CPU models; ``auto`` never picks an emulated platform.
    """

    name = "ascend"
    device_type = "npu"
    emulate_env = _vendor.EMULATE_ENV
    vendor_name = "Ascend"

    @classmethod
    def probe(cls) -> Probe:
        return _vendor.probe_torch_npu()

    @classmethod
    def device_capabilities(cls) -> Capabilities:
        # float16 runs on every Ascend line (bfloat16 needs A2 or later): pass --dtype bfloat16 there.
        return Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            default_dtype=torch.float16, supports_graphs=False,
                            dist_backend="hccl", priority=100)

    def make_kv_backend(self, spec: KVCacheSpec, num_blocks: int) -> AscendKVBackend:
        return AscendKVBackend(spec, num_blocks, self.device)

    def make_attention_backend(self) -> AscendAttentionBackend:
        return AscendAttentionBackend(_vendor.load_ops())

    def make_comm_backend(self, rank: int, world_size: int) -> AscendComm:
        return AscendComm(self.device)
