"""Hook specifications of the ``sagellm`` plugin system.

A backend distribution exposes a module under the ``sagellm.backends`` entry-point group; that
module implements the hooks below with ``@sagellm.hookimpl``. Hooks receive a ``register``
callback rather than returning values, so they can gain keyword arguments later without breaking
existing plugins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from sagellm.protocols import Platform

PROJECT_NAME = "sagellm"
ENTRY_POINT_GROUP = "sagellm.backends"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def sagellm_register_backends(register: Callable[[type[Platform]], None]) -> None:
    """Hand core the :class:`~sagellm.protocols.Platform` classes this plugin provides.

    Called once per discovery (engine start, ``sagellm backends``, server start-up), before any
    platform is instantiated. Call ``register(PlatformClass)`` once per platform. Must be cheap:
    do not touch the device here; report device problems from ``Platform.is_available``.
    """


@hookspec
def sagellm_engine_started(engine_info: dict[str, object]) -> None:
    """Observe an engine that has finished start-up (backend, model, KV capacity, timings).

    Called once by ``LLMEngine`` after its KV pool exists. Return values are ignored; an exception
    is logged and ignored.
    """
