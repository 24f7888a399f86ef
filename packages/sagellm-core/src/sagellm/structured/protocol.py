"""The per-request token constraint the sampler consults: defined once, with the engine's side of
the contract (who calls what, each step), in :mod:`sagellm.engine.constraint`."""

from __future__ import annotations

from sagellm.engine.constraint import TokenConstraint

__all__ = ["TokenConstraint"]
