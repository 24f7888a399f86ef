"""Finding torch_mlu (and the optional torch_mlu_ops), and the test-only CPU emulation switch.

``SAGELLM_MLU_EMULATE=cpu`` is for CI without Cambricon hardware: the platform then reports
itself available, places everything on the CPU, uses gloo, and calls CPU models of the
torch_mlu_ops functions it uses (``sagellm_mlu._emulated_ops``). No Cambricon code runs in that
mode. Never set it in production.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from sagellm.backends.accelerator import Probe
from sagellm.backends.accelerator import emulation_mode as _emulation_mode

EMULATE_ENV = "SAGELLM_MLU_EMULATE"
INSTALL_HINT = (f"install torch_mlu (Cambricon PyTorch, from Cambricon's SDK release matching "
                f"torch {torch.__version__.split('+')[0]}) with the CNToolkit, CNNL and CNCL runtime "
                f"and the MLU driver")


def emulation_mode() -> str | None:
    """``"cpu"`` when the test-only emulation is on, ``None`` when off; raises on a bad value."""
    return _emulation_mode(EMULATE_ENV)


def probe_torch_mlu() -> Probe:
    """Import torch_mlu and look for devices; every failure becomes a reason, never an error."""
    if importlib.util.find_spec("torch_mlu") is None:
        return Probe(False, f"torch_mlu is not installed: {INSTALL_HINT}")
    try:
        torch_mlu = importlib.import_module("torch_mlu")
    except Exception as exc:  # missing CNToolkit libraries surface here as ImportError/OSError
        return Probe(False, f"torch_mlu is installed but failed to import ({type(exc).__name__}: "
                            f"{exc}); the CNToolkit/CNNL runtime or MLU driver is missing or not on "
                            f"LD_LIBRARY_PATH (NEUWARE_HOME)")
    version = getattr(torch_mlu, "__version__", "?")
    try:
        mlu = torch.mlu  # type: ignore[attr-defined]
        count = int(mlu.device_count()) if mlu.is_available() else 0
    except Exception as exc:
        return Probe(False, f"MLU driver error while querying devices with torch_mlu {version}: "
                            f"{type(exc).__name__}: {exc}")
    if count == 0:
        return Probe(False, f"torch_mlu {version} loaded but no MLU is visible (check `cnmon` and "
                            f"MLU_VISIBLE_DEVICES={os.environ.get('MLU_VISIBLE_DEVICES', '')!r})")
    try:
        name = mlu.get_device_name(0)
    except Exception:
        name = "Cambricon MLU"
    ops = "torch_mlu_ops" if importlib.util.find_spec("torch_mlu_ops") else (
        "none (install torch_mlu_ops for fused paged attention; using torch reference attention)")
    return Probe(True, f"{count} x {name}, torch_mlu {version}; fused ops: {ops}", torch_mlu)


def load_ops() -> ModuleType | None:
    """torch_mlu_ops, its CPU models under emulation, or None (torch reference attention)."""
    if emulation_mode() == "cpu":
        from sagellm_mlu import _emulated_ops

        return _emulated_ops
    if not probe_torch_mlu().ok or importlib.util.find_spec("torch_mlu_ops") is None:
        return None
    try:
        return importlib.import_module("torch_mlu_ops")
    except Exception:
        return None
