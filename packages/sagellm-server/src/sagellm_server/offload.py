"""Tokenizer work (chat templates, tokenization) in worker threads, off the event loop.

A 3 MB prompt takes seconds to tokenize, and a request's chat template is the client's code:
on the event loop either would stall every other client, /health included. HF fast tokenizers
release the GIL while encoding but must not be used from two threads at once, so each worker
thread owns a copy of the tokenizer, made up front on the thread that constructs the pool.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

#: Two threads: a long tokenization leaves one free for everyone else, and the machine's other
#: cores stay with the engine.
DEFAULT_NUM_THREADS = 2


class TokenizerPool:
    """``await pool.run(fn)`` calls ``fn(tokenizer)`` in a worker with its own tokenizer copy."""

    def __init__(self, tokenizer: Any, num_threads: int = DEFAULT_NUM_THREADS) -> None:
        assert num_threads >= 1
        self._spare = [copy.deepcopy(tokenizer) if tokenizer is not None else None
                       for _ in range(num_threads)]
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="sagellm-tokenizer",
                                        initializer=self._adopt)

    def _adopt(self) -> None:
        self._local.tokenizer = self._spare.pop()  # list.pop is atomic: one copy per thread

    async def run(self, fn: Callable[[Any], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, fn)

    def _call(self, fn: Callable[[Any], T]) -> T:
        return fn(self._local.tokenizer)

    def close(self) -> None:
        # Work already running finishes in its thread (a render stops at its deadline).
        self._pool.shutdown(wait=False, cancel_futures=True)
