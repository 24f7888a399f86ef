"""sageLLM's OpenAI-compatible HTTP server.

``sagellm-server`` (see :mod:`sagellm_server.cli`) loads one engine, runs it in a single
background thread (:class:`~sagellm_server.async_engine.AsyncEngine`) and serves every HTTP
client from it, so requests from different clients are batched together.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
