"""The Ascend platform: device ``npu`` through torch_npu, HCCL for communication."""

from __future__ import annotations

from sagellm.backends.vendor import VendorPlatform
from sagellm_ascend._vendor import TORCH_NPU
from sagellm_ascend.attention import AscendAttentionBackend
from sagellm_ascend.kv import AscendKVBackend


class AscendPlatform(VendorPlatform):
    """Huawei Ascend NPUs (Atlas A2/A3 and later) through torch_npu.

    float16 is the default since every Ascend line runs it; bfloat16 needs A2 or later. Under the
    test-only ``SAGELLM_ASCEND_EMULATE=cpu`` the device is the CPU, communication is gloo and the
    fused ops are CPU models; ``auto`` never picks an emulated platform.
    """

    name = "ascend"
    vendor_name = "Ascend"
    vendor = TORCH_NPU
    dist_backend = "hccl"
    kv_backend = AscendKVBackend
    attention_backend = AscendAttentionBackend
