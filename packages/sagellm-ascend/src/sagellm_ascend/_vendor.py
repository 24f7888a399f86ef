"""Finding torch_npu, and the test-only CPU emulation switch.

``SAGELLM_ASCEND_EMULATE=cpu`` is for CI without Ascend hardware: the platform then reports
itself available, places everything on the CPU, uses gloo, and calls CPU models of the torch_npu
ops it uses (``sagellm_ascend._emulated_ops``). No Ascend code runs in that mode; it exists so the
conformance suite exercises this package's own logic (metadata built for the fused ops, fallback
paths, KV layout) on every CI run. Never set it in production.
"""

from __future__ import annotations

import torch

from sagellm.backends.vendor import VendorLibrary

TORCH_NPU = VendorLibrary(
    module="torch_npu",
    device_type="npu",
    install_hint=(f"pip install torch-npu (the Ascend Extension for PyTorch release matching torch "
                  f"{torch.__version__.split('+')[0]}) and install the CANN toolkit and Ascend driver"),
    import_hint=("the CANN toolkit or Ascend driver is missing or not sourced "
                 "(source /usr/local/Ascend/ascend-toolkit/set_env.sh)"),
    driver="Ascend driver",
    devices="NPUs",
    device="NPU",
    list_command="`npu-smi info`",
    visible_env="ASCEND_RT_VISIBLE_DEVICES",
    default_device_name="Ascend NPU",
    emulate_env="SAGELLM_ASCEND_EMULATE",
    emulated_ops="sagellm_ascend._emulated_ops",
)
