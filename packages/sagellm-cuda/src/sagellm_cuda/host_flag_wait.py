"""The device waits for a word in page-locked host memory (the driver's ``cuStreamWaitValue32``).

With asynchronous scheduling and structured output, a step's masks are filled on the mask-fill
worker while the step's forward runs (``sagellm.engine.mask_fill``). Without this the host waits
for the worker before it queues the mask's copy and the masked argmax, so the worker's time
(accepting the previous step's tokens, then filling) sits on the host's path to the next step.
With it the host queues the copy behind a stream wait on the worker's flag word and goes on:
the device, which is still running the forward, reaches the wait later and rarely waits there.

The driver entry point is called through ``ctypes`` (PyTorch does not expose it). It is probed
once per process with a wait that is already satisfied; where the symbol is missing or the call
fails, or ``SAGELLM_MASK_DEVICE_WAIT=0``, the runner keeps the host wait.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable

import torch

logger = logging.getLogger("sagellm.cuda")

#: ``0`` (or ``false``, ``no``, ``off``) keeps the host waiting for every mask fill.
ENV = "SAGELLM_MASK_DEVICE_WAIT"
#: ``CU_STREAM_WAIT_VALUE_GEQ``: wait until ``(int32_t)(*addr - value) >= 0`` (cyclic).
_WAIT_GEQ = 0x0

_FN: Callable[..., int] | None = None
_PROBED = False
_LOCK = threading.Lock()


def enabled_by_env() -> bool:
    """Whether :data:`ENV` allows device waits (unset: yes); ``ValueError`` naming it for a
    value that is not a yes or a no."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("", "1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV} must be 0 or 1, got {raw!r}")


def _load() -> Callable[..., int] | None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuStreamWaitValue32_v2
    except (OSError, AttributeError) as exc:
        logger.info("the driver has no cuStreamWaitValue32_v2 (%s): structured-output masks "
                    "are waited for on the host", exc)
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def _probe(device: torch.device) -> Callable[..., int] | None:
    fn = _load()
    if fn is None:
        return None
    with torch.inference_mode(False):
        flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    stream = torch.cuda.current_stream(device)
    rc = fn(stream.cuda_stream, flag.data_ptr(), 0, _WAIT_GEQ)  # already true: never blocks
    stream.synchronize()
    if rc != 0:
        logger.info("cuStreamWaitValue32 is not usable here (CUresult %d): structured-output "
                    "masks are waited for on the host", rc)
        return None
    return fn


def host_flag_wait(device: torch.device) -> Callable[[torch.Tensor, int], bool] | None:
    """``wait(flag, value)`` for ``device``'s current stream, or ``None`` where the device
    cannot wait on host memory (not a CUDA device, the driver lacks it, or :data:`ENV` says no).
    ``wait`` queues the wait and returns ``True``; ``False`` (nothing queued) for a flag that is
    not page-locked host memory; a failing driver call raises ``RuntimeError``."""
    global _FN, _PROBED
    if device.type != "cuda" or not enabled_by_env():
        return None
    with _LOCK:
        if not _PROBED:
            _FN, _PROBED = _probe(device), True
        fn = _FN
    if fn is None:
        return None

    def wait(flag: torch.Tensor, value: int) -> bool:
        if flag.device.type != "cpu" or not flag.is_pinned() or flag.dtype != torch.int32:
            return False
        rc = fn(torch.cuda.current_stream(device).cuda_stream, flag.data_ptr(),
                value & 0xFFFFFFFF, _WAIT_GEQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed (CUresult {rc})")
        return True

    return wait
