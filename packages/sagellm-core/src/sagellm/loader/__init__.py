"""Finding and loading models: HF directories, GGUF files, dummy weights, the embedded default."""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["LoadedModel", "load_model", "resolve_model_path"]

if TYPE_CHECKING:
    from sagellm.loader.loader import LoadedModel, load_model, resolve_model_path


def __getattr__(name: str) -> object:
    # loader.py imports torch; `sagellm cache` and `default_model` must stay light.
    if name in __all__:
        from sagellm.loader import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'sagellm.loader' has no attribute {name!r}")
