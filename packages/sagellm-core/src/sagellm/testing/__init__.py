"""Test kit for backend authors: the conformance suite and the doubles it is built from.

* :class:`BackendSuite` - subclass it in one line to run every conformance test on a platform.
* :func:`make_tiny_llama`, :func:`greedy_generate` - a tiny random checkpoint and a greedy run.
* :func:`make_paged_case`, :func:`dense_attention` - paged attention inputs and their reference.
* :func:`make_distribution` - a throw-away installed distribution, for plugin-discovery tests.
* :class:`RecordingAttentionBackend` - wraps any attention backend and records its calls.

Importing this module imports pytest; it is meant for test code only, and the ``testing``
extra installs it: ``pip install "sagellm-core[testing]"``.
"""

from __future__ import annotations

try:
    import pytest  # noqa: F401  (imported first so a missing pytest is named, not a deep traceback)
except ImportError as exc:
    raise ImportError('sagellm.testing needs pytest, which the "testing" extra installs: '
                      'pip install "sagellm-core[testing]"') from exc

from sagellm.testing.distributions import make_distribution
from sagellm.testing.doubles import RecordingAttentionBackend
from sagellm.testing.reference import PagedCase, dense_attention, make_paged_case
from sagellm.testing.suite import BackendSuite
from sagellm.testing.tiny_model import greedy_generate, make_tiny_llama

__all__ = [
    "BackendSuite",
    "PagedCase",
    "RecordingAttentionBackend",
    "dense_attention",
    "greedy_generate",
    "make_distribution",
    "make_paged_case",
    "make_tiny_llama",
]
