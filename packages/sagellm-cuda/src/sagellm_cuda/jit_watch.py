"""Which Triton kernels compiled in this process, and which of them while it served.

Triton compiles a kernel the first time it runs with a new specialisation (constexpr values,
integer arguments equal to 1 or divisible by 16, dtypes): a few hundred milliseconds, during
which the step that needed it, and every request in it, waits. The engine's start-up warm-up
(``sagellm.engine.warmup``) exists to take those compiles out of serving; this module checks
it. :func:`install` (done by the CUDA runner) counts every compile through Triton's
``jit_post_compile_hook``, keeping any hook that was set before; after the first engine of the
process reports itself started (``sagellm_engine_started``), each further compile is logged at
INFO with the kernel's name and specialisation, since requests waited for it.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from typing import Any

logger = logging.getLogger("sagellm.cuda.jit")

_lock = threading.Lock()
_installed = False
_started = False
#: Compiles per kernel name since :func:`install`.
counts: Counter[str] = Counter()
#: Compiles per kernel name after the first engine started (requests may have waited for them).
while_serving: Counter[str] = Counter()
#: The last compiles, as (kernel name, Triton's description of the specialisation).
recent: deque[tuple[str, str]] = deque(maxlen=256)


def install() -> bool:
    """Start counting compiles (once per process); ``False`` where Triton has no such hook."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from triton import knobs
        except ImportError:  # older Triton: no knobs, nothing to count
            return False
        runtime = knobs.runtime
        previous = runtime.jit_post_compile_hook

        def hook(*args: Any, **kwargs: Any) -> Any:
            _count(kwargs.get("fn"), kwargs.get("repr"))
            return previous(*args, **kwargs) if previous is not None else None

        runtime.jit_post_compile_hook = hook
        _installed = True
        return True


def _count(fn: Any, spec: Any) -> None:
    name = str(getattr(fn, "name", None) or "?")
    counts[name] += 1
    recent.append((name, str(spec)))
    if _started:
        while_serving[name] += 1
        logger.info("Triton compiled %s while serving (requests in that step waited for it): %s",
                    name, spec)


def engine_started() -> None:
    """From now on a compile is logged: the engine has warmed up and serves."""
    global _started
    _started = True


def total() -> int:
    """Compiles counted so far."""
    return sum(counts.values())
