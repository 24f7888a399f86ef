"""Finding torch_npu, and the test-only CPU emulation switch.

``SAGELLM_ASCEND_EMULATE=cpu`` is for CI without Ascend hardware: the platform then reports
itself available, places everything on the CPU, uses gloo, and calls CPU models of the torch_npu
ops it uses (``sagellm_ascend._emulated_ops``). No Ascend code runs in that mode; it exists so the
conformance suite exercises this package's own logic (metadata built for the fused ops, fallback
paths, KV layout) on every CI run. Never set it in production.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from sagellm.backends.accelerator import Probe
from sagellm.backends.accelerator import emulation_mode as _emulation_mode

EMULATE_ENV = "SAGELLM_ASCEND_EMULATE"
INSTALL_HINT = (f"pip install torch-npu (the Ascend Extension for PyTorch release matching torch "
                f"{torch.__version__.split('+')[0]}) and install the CANN toolkit and Ascend driver")


def emulation_mode() -> str | None:
    """``"cpu"`` when the test-only emulation is on, ``None`` when off; raises on a bad value."""
    return _emulation_mode(EMULATE_ENV)


def probe_torch_npu() -> Probe:
    """Import torch_npu and look for devices; every failure becomes a reason, never an error."""
    if importlib.util.find_spec("torch_npu") is None:
        return Probe(False, f"torch_npu is not installed: {INSTALL_HINT}")
    try:
        torch_npu = importlib.import_module("torch_npu")
    except Exception as exc:  # missing CANN libraries surface here as ImportError/OSError
        return Probe(False, f"torch_npu is installed but failed to import ({type(exc).__name__}: "
                            f"{exc}); the CANN toolkit or Ascend driver is missing or not sourced "
                            f"(source /usr/local/Ascend/ascend-toolkit/set_env.sh)")
    version = getattr(torch_npu, "__version__", "?")
    try:
        npu = torch.npu  # type: ignore[attr-defined]
        count = int(npu.device_count()) if npu.is_available() else 0
    except Exception as exc:
        return Probe(False, f"Ascend driver error while querying NPUs with torch_npu {version}: "
                            f"{type(exc).__name__}: {exc}")
    if count == 0:
        return Probe(False, f"torch_npu {version} loaded but no NPU is visible (check `npu-smi info` "
                            f"and ASCEND_RT_VISIBLE_DEVICES={os.environ.get('ASCEND_RT_VISIBLE_DEVICES', '')!r})")
    try:
        name = npu.get_device_name(0)
    except Exception:
        name = "Ascend NPU"
    return Probe(True, f"{count} x {name}, torch_npu {version}", torch_npu)


def load_ops() -> ModuleType | None:
    """The namespace holding the fused ops: torch_npu, its CPU models under emulation, or None."""
    if emulation_mode() == "cpu":
        from sagellm_ascend import _emulated_ops

        return _emulated_ops
    probe = probe_torch_npu()
    return probe.module if probe.ok else None
