"""The module the ``sagellm.backends`` entry point names: hook implementations only.

Keep it cheap to import (no device work): it is imported by every ``sagellm backends`` call
and at server start-up, and an import slower than two seconds is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sagellm.hookspecs import hookimpl
from sagellm.protocols import Platform
from sagellm_example_backend.platform import ExamplePlatform

logger = logging.getLogger(__name__)


@hookimpl
def sagellm_register_backends(register: Callable[[type[Platform]], None]) -> None:
    register(ExamplePlatform)


@hookimpl
def sagellm_engine_started(engine_info: dict[str, object]) -> None:
    if engine_info.get("backend") == ExamplePlatform.name:
        logger.info("example backend serving %s with %s KV blocks", engine_info.get("model"),
                    engine_info.get("num_kv_blocks"))
