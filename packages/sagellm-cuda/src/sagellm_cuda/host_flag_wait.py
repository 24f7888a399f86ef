"""The device waits for a word in page-locked host memory (the driver's ``cuStreamWaitValue32``).

With asynchronous scheduling and structured output, a step's masks are filled on the mask-fill
worker while the step's forward runs (``sagellm.engine.mask_fill``). Without this the host waits
for the worker before it queues the mask's copy and the masked argmax, so the worker's time
(accepting the previous step's tokens, then filling) sits on the host's path to the next step.
With it the host queues the copy behind a stream wait on the worker's flag word and goes on:
the device, which is still running the forward, reaches the wait later and rarely waits there.

**On by default; ``SAGELLM_MASK_DEVICE_WAIT=0`` keeps the host wait.** Before the first wait,
:func:`check` must have passed, in a child process with a time limit (a wait that never ends
takes only the child with it): the wait must hold the stream, then let it go once the host
writes the word. The child starts when the runner is made (after the KV cache is sized, so its
CUDA context is not counted as used memory) and runs beside graph capture; the first mask
fill that could use the wait takes its answer (a few seconds at most, once). Where the check
fails (or the symbol is missing, or the call fails), the runner keeps the host wait and logs
why. The driver entry point is called through ``ctypes`` (PyTorch does not expose it).

**Lazy module loading and the one way to deadlock.** With CUDA's lazy loading (the default
since CUDA 12), the first launch of a kernel loads its module, and loading may synchronise the
context, so it waits for every stream, the held one included. A thread that queues a wait and
then launches a kernel the process has not launched before blocks until the word is written;
if that same thread is the one that writes the word, it never is. That is how the first GPU
test of this wait hung (on an H100, driver 580.159.04): its kernel after the wait was new to
the process. The check therefore launches its kernels once before it queues the wait. In the
engine the word is written by the mask-fill worker, which needs nothing from the thread that
queued the wait except the GIL (PyTorch and Triton release it while they load or launch), so a
first launch behind a wait only stalls until the fill is done; the start-up warm-up launches
every kernel of a step before any request is served.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable

import torch

logger = logging.getLogger("sagellm.cuda")

#: ``0`` (or ``false``, ``no``, ``off``) keeps the host waiting for every mask fill; unset or
#: ``1`` lets the device wait, once :func:`check` has passed.
ENV = "SAGELLM_MASK_DEVICE_WAIT"
#: Seconds the child process of :func:`check` may take (CUDA start-up included).
CHECK_TIMEOUT_S = 90
#: ``CU_STREAM_WAIT_VALUE_GEQ``: wait until ``(int32_t)(*addr - value) >= 0`` (cyclic).
_WAIT_GEQ = 0x0

_PROBES: dict[int, _Probe] = {}
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


class _Probe:
    """The driver's entry point and the verdict of :func:`check` for one device: the check's
    child process starts when the probe is made, and :meth:`usable` takes its answer once."""

    def __init__(self, device_index: int) -> None:
        self.fn = _load()
        self.verdict: str | None = None if self.fn is not None else "no cuStreamWaitValue32_v2"
        self._pending = _start_check(device_index) if self.fn is not None else None
        self._lock = threading.Lock()

    def usable(self) -> bool:
        """Whether the check passed (waiting for its child the first time)."""
        with self._lock:
            if self.verdict is None:
                assert self._pending is not None
                self.verdict, self._pending = self._pending.result(), None
                if self.verdict != "ok":
                    logger.warning("the GPU's wait on a host word failed its check (%s): "
                                   "structured-output masks are waited for on the host",
                                   self.verdict)
        return self.verdict == "ok"


class _PendingCheck:
    """A running check: its child process and deadline."""

    def __init__(self, device_index: int, timeout_s: float, start: int, value: int) -> None:
        import subprocess
        import sys
        import time

        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sagellm_cuda.host_flag_wait", "--check", str(device_index),
             str(start), str(value)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def result(self) -> str:
        """``"ok"``, or what went wrong (a child past its deadline is killed)."""
        import subprocess
        import time

        try:
            out, err = self.proc.communicate(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return f"the check did not finish in {self.timeout_s:g} s"
        lines = out.strip().splitlines()
        if self.proc.returncode != 0 or not lines:
            return f"the check exited with {self.proc.returncode}: {err.strip()[-300:]}"
        return lines[-1]


def _start_check(device_index: int, timeout_s: float = CHECK_TIMEOUT_S, start: int = 0,
                 value: int = 1) -> _PendingCheck:
    return _PendingCheck(device_index, timeout_s, start, value)


def check(device_index: int, timeout_s: float = CHECK_TIMEOUT_S, start: int = 0,
          value: int = 1) -> str:
    """Run :func:`_check_here` in a child process (a wait that never ends takes only the child
    with it): ``"ok"``, or what went wrong."""
    return _start_check(device_index, timeout_s, start, value).result()


def _check_here(device_index: int, start: int = 0, value: int = 1) -> str:
    """Queue a wait for ``value`` on a word that holds ``start`` (cyclically before it), behind
    it a kernel and an event; the event must not complete until the host writes ``value``, and
    must within 2 s after it."""
    import time

    fn = _load()
    if fn is None:
        return "no cuStreamWaitValue32_v2"
    device = torch.device("cuda", device_index)
    torch.cuda.set_device(device)
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    word = flag.numpy().view("uint32")
    word[0] = start & 0xFFFFFFFF
    out = torch.zeros(1, device=device)
    out += 1  # load the kernel now: a first launch behind the wait would wait for it (above)
    event = torch.cuda.Event()
    event.record()
    torch.cuda.synchronize(device)
    stream = torch.cuda.current_stream(device)
    rc = fn(stream.cuda_stream, flag.data_ptr(), value & 0xFFFFFFFF, _WAIT_GEQ)
    if rc != 0:
        return f"cuStreamWaitValue32 returned CUresult {rc}"
    out += 1
    event.record(stream)
    time.sleep(0.05)
    if event.query():
        return "the stream did not wait for the word"
    word[0] = value & 0xFFFFFFFF
    deadline = time.monotonic() + 2.0
    while not event.query():
        if time.monotonic() > deadline:
            return "the stream did not see the host's write within 2 s"
        time.sleep(0.001)
    return "ok"


def host_flag_wait(device: torch.device) -> Callable[[torch.Tensor, int], bool] | None:
    """``wait(flag, value)`` for ``device``'s current stream, or ``None`` where the device
    cannot wait on host memory (not a CUDA device, the driver lacks it, or :data:`ENV` says no).
    Starts the device's :func:`check` (once per process and device). ``wait`` queues the wait
    and returns ``True``; ``False`` (nothing queued) where the check failed or for a flag that
    is not page-locked host memory; a failing driver call raises ``RuntimeError``."""
    if device.type != "cuda" or not enabled_by_env():
        return None
    index = device.index or 0
    with _LOCK:
        probe = _PROBES.get(index)
        if probe is None:
            probe = _PROBES[index] = _Probe(index)
    fn = probe.fn
    if fn is None:
        return None

    def wait(flag: torch.Tensor, value: int) -> bool:
        if flag.device.type != "cpu" or not flag.is_pinned() or flag.dtype != torch.int32:
            return False
        if not probe.usable():
            return False
        rc = fn(torch.cuda.current_stream(device).cuda_stream, flag.data_ptr(),
                value & 0xFFFFFFFF, _WAIT_GEQ)
        if rc != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed (CUresult {rc})")
        return True

    return wait


if __name__ == "__main__":  # the child process of :func:`check`
    import sys

    if len(sys.argv) == 5 and sys.argv[1] == "--check":
        print(_check_here(*(int(a) for a in sys.argv[2:])), flush=True)
        os._exit(0)  # never wait for a stream that may still be held
    sys.exit("usage: python -m sagellm_cuda.host_flag_wait --check DEVICE_INDEX START VALUE")
