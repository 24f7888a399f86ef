"""Entry point of sagellm-mlu (``sagellm.backends: mlu``): hook implementations only."""

from __future__ import annotations

from collections.abc import Callable

from sagellm.hookspecs import hookimpl
from sagellm.protocols import Platform
from sagellm_mlu.platform import MluPlatform


@hookimpl
def sagellm_register_backends(register: Callable[[type[Platform]], None]) -> None:
    register(MluPlatform)
