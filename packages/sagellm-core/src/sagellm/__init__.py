"""sageLLM: a modular LLM inference engine with pluggable hardware backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagellm.hookspecs import hookimpl
from sagellm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "hookimpl", "__version__"]

if TYPE_CHECKING:
    from sagellm.llm import LLM


def __getattr__(name: str) -> object:
    # LLM pulls in transformers; keep `import sagellm` (plugins, CLI `backends`) light.
    if name == "LLM":
        from sagellm.llm import LLM

        return LLM
    raise AttributeError(f"module 'sagellm' has no attribute {name!r}")
