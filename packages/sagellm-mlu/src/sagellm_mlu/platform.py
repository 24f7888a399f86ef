"""The Cambricon MLU platform: device ``mlu`` through torch_mlu, CNCL for communication."""

from __future__ import annotations

from sagellm.backends.vendor import VendorPlatform
from sagellm_mlu._vendor import TORCH_MLU
from sagellm_mlu.attention import MluAttentionBackend
from sagellm_mlu.kv import MluKVBackend


class MluPlatform(VendorPlatform):
    """Cambricon MLUs (MLU370, MLU590 and later) through torch_mlu.

    float16 is the default since every MLU generation runs it; pass ``--dtype bfloat16`` where
    the chip supports it. Under the test-only ``SAGELLM_MLU_EMULATE=cpu`` the device is the CPU,
    communication is gloo and the fused ops are CPU models; ``auto`` never picks an emulated
    platform.
    """

    name = "mlu"
    vendor_name = "MLU"
    vendor = TORCH_MLU
    dist_backend = "cncl"
    kv_backend = MluKVBackend
    attention_backend = MluAttentionBackend
