"""Finding torch_mlu (and the optional torch_mlu_ops), and the test-only CPU emulation switch.

``SAGELLM_MLU_EMULATE=cpu`` is for CI without Cambricon hardware: the platform then reports
itself available, places everything on the CPU, uses gloo, and calls CPU models of the
torch_mlu_ops functions it uses (``sagellm_mlu._emulated_ops``). No Cambricon code runs in that
mode. Never set it in production.
"""

from __future__ import annotations

import torch

from sagellm.backends.vendor import VendorLibrary

TORCH_MLU = VendorLibrary(
    module="torch_mlu",
    device_type="mlu",
    install_hint=(f"install torch_mlu (Cambricon PyTorch, from Cambricon's SDK release matching "
                  f"torch {torch.__version__.split('+')[0]}) with the CNToolkit, CNNL and CNCL "
                  f"runtime and the MLU driver"),
    import_hint=("the CNToolkit/CNNL runtime or MLU driver is missing or not on LD_LIBRARY_PATH "
                 "(NEUWARE_HOME)"),
    driver="MLU driver",
    devices="devices",
    device="MLU",
    list_command="`cnmon`",
    visible_env="MLU_VISIBLE_DEVICES",
    default_device_name="Cambricon MLU",
    emulate_env="SAGELLM_MLU_EMULATE",
    emulated_ops="sagellm_mlu._emulated_ops",
    # Optional: without it every op uses the torch reference attention.
    ops_module="torch_mlu_ops",
)
