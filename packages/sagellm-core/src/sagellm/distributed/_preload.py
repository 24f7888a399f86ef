"""Imported once by the forkserver, so that forked worker ranks skip the slow imports.

``transformers`` imports lazily; reading a model's config pulls in that family's modules, which
takes seconds. Touch the families core implements here, once, instead of in every worker.
"""

from __future__ import annotations

import contextlib

import sagellm.distributed.disagg  # noqa: F401
import sagellm.distributed.tp_worker  # noqa: F401
import sagellm.engine.builder  # noqa: F401

with contextlib.suppress(Exception):
    import transformers

    for name in ("AutoConfig", "AutoTokenizer", "LlamaConfig", "Qwen2Config"):
        getattr(transformers, name)
