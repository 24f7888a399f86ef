"""Entry point of sagellm-ascend (``sagellm.backends: ascend``): hook implementations only."""

from __future__ import annotations

from collections.abc import Callable

from sagellm.hookspecs import hookimpl
from sagellm.protocols import Platform
from sagellm_ascend.platform import AscendPlatform


@hookimpl
def sagellm_register_backends(register: Callable[[type[Platform]], None]) -> None:
    register(AscendPlatform)
