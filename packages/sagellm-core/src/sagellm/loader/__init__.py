"""Finding and loading models: HF directories, GGUF files, dummy weights, the embedded default."""

from __future__ import annotations

from sagellm.loader.loader import LoadedModel, load_model, resolve_model_path

__all__ = ["LoadedModel", "load_model", "resolve_model_path"]
