"""The llama.cpp row of ``cpu_decode.py``: the same GGUF file, token ids and greedy loop shape
through ``llama-cpp-python``'s low-level API (one context, up to 8 sequences batched per
``llama_decode``, argmax on the host).

``llama-cpp-python`` is not a dependency of the project and is not installed in CI: it builds
from its sdist (about 20 minutes on 2 cores). Build it outside the repo, e.g.::

    CMAKE_BUILD_PARALLEL_LEVEL=1 nice -n 19 pip install --no-deps --target /work/wt/llamacpp-target \\
        llama-cpp-python diskcache

and pass ``--llama-cpp-site /work/wt/llamacpp-target`` to ``cpu_decode.py``. Without it the row
is skipped with a message saying so.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

import numpy as np

#: Sequences the context holds at once (the 8-concurrent workload) and tokens per sequence.
MAX_SEQS = 8
CTX_PER_SEQ = 1024


def import_llama_cpp(site: str | None) -> Any:
    """``llama_cpp``, or ``None`` with the reason printed."""
    if site:
        sys.path.insert(0, site)
    try:
        import llama_cpp
    except ImportError as exc:
        print(f"llama.cpp row skipped: llama_cpp is not importable ({exc}); build llama-cpp-python "
              "outside the repo and pass --llama-cpp-site (see cpu_decode_llama_cpp.py)", flush=True)
        return None
    return llama_cpp


class LlamaCppGreedy:
    """Greedy generation of several token-id prompts at once on one llama.cpp context."""

    def __init__(self, lib: Any, model_path: str, threads: int) -> None:
        self.lib = lib
        # The high-level Llama loads the model; the context is ours (it fixes n_seq_max to 1).
        self.llm = lib.Llama(model_path=model_path, n_ctx=512, n_threads=threads,
                             verbose=bool(os.environ.get("LLAMA_VERBOSE")))
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = MAX_SEQS * CTX_PER_SEQ, 512, 512
        params.n_threads = params.n_threads_batch = threads
        params.n_seq_max = MAX_SEQS
        params.kv_unified = True
        self.ctx = lib.llama_init_from_model(self.llm._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = self.llm.n_vocab()
        self.batch = lib.llama_batch_init(512, 0, MAX_SEQS)

    def _clear(self) -> None:
        lib = self.lib
        if hasattr(lib, "llama_memory_clear"):
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        else:  # older bindings
            lib.llama_kv_self_clear(self.ctx)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode ``(token, pos, seq, want_logits)`` items; the argmax of each wanted row."""
        b = self.batch
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = want
        b.n_tokens = len(items)
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i, item in enumerate(items):
            if item[3]:
                ptr = self.lib.llama_get_logits_ith(self.ctx, i)
                row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                            shape=(self.n_vocab,))
                out.append(int(row.argmax()))
        return out

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        """``n`` greedy tokens for each prompt (all prompts prefilled in one batch, or one
        512-token chunk at a time when they do not fit)."""
        self._clear()
        nxt: list[int] = []
        pending = [(t, j, s, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)]
        for start in range(0, len(pending), 512):
            nxt += self._decode(pending[start:start + 512])
        outs = [[t] for t in nxt]
        for step in range(1, n):
            nxt = self._decode([(outs[s][-1], len(p) + step - 1, s, True)
                                for s, p in enumerate(prompts)])
            for s, t in enumerate(nxt):
                outs[s].append(t)
        return outs

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.llm.close()
