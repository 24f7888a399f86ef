"""The Cambricon MLU platform: device ``mlu`` through torch_mlu, CNCL for communication."""

from __future__ import annotations

import torch

from sagellm.backends.accelerator import Probe, TorchAcceleratorPlatform
from sagellm.protocols import Capabilities, KVCacheSpec
from sagellm_mlu import _vendor
from sagellm_mlu.attention import MluAttentionBackend
from sagellm_mlu.comm import MluComm
from sagellm_mlu.kv import MluKVBackend


class MluPlatform(TorchAcceleratorPlatform):
    """Cambricon MLUs (MLU370, MLU590 and later) through torch_mlu.

    Under the test-only ``SAGELLM_MLU_EMULATE=cpu`` the device is the CPU, communication is
    gloo and the fused ops are CPU models; ``auto`` never picks an emulated platform.
    """

    name = "mlu"
    device_type = "mlu"
    emulate_env = _vendor.EMULATE_ENV
    vendor_name = "MLU"

    @classmethod
    def probe(cls) -> Probe:
        return _vendor.probe_torch_mlu()

    @classmethod
    def device_capabilities(cls) -> Capabilities:
        # float16 runs on every MLU generation; pass --dtype bfloat16 where the chip supports it.
        return Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            default_dtype=torch.float16, supports_graphs=False,
                            dist_backend="cncl", priority=100)

    def make_kv_backend(self, spec: KVCacheSpec, num_blocks: int) -> MluKVBackend:
        return MluKVBackend(spec, num_blocks, self.device)

    def make_attention_backend(self) -> MluAttentionBackend:
        return MluAttentionBackend(_vendor.load_ops())

    def make_comm_backend(self, rank: int, world_size: int) -> MluComm:
        return MluComm(self.device)
