"""sageLLM: a modular LLM inference engine with pluggable hardware backends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagellm.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "hookimpl", "__version__"]

if TYPE_CHECKING:
    from sagellm.llm import LLM
    from sagellm.sampling_params import SamplingParams


def __getattr__(name: str) -> object:
    # LLM pulls in transformers and torch, SamplingParams pydantic; `import sagellm` (plugins,
    # `sagellm --help`) stays light.
    if name == "LLM":
        from sagellm.llm import LLM

        return LLM
    if name == "SamplingParams":
        from sagellm.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'sagellm' has no attribute {name!r}")
