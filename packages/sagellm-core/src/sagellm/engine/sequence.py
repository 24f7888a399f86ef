"""A request as the engine tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from sagellm.kv_cache.block_hash import check_cache_salt
from sagellm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    #: The engine failed this request (``RequestOutput.error`` says how); others went on.
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self.value in _FINISHED_VALUES


_FINISHED_VALUES = frozenset({"stop", "length", "abort", "error"})


@dataclass
class SequenceMetrics:
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


class SequenceState:
    """Prompt plus generated tokens, KV blocks and progress.

    ``num_computed_tokens`` counts tokens whose keys and values are in the cache. Each step
    computes tokens ``[num_computed_tokens, num_computed_tokens + n)``; when that reaches
    ``num_tokens`` a new token is sampled. A decode is the case ``n == 1``.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), cache_salt: str | None = None
                 ) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        #: Only requests with the same salt share cached KV blocks (``None``: the common cache).
        self.cache_salt = check_cache_salt(cache_salt)
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        #: Keys of the full blocks at the head of ``block_table`` (prefix caching;
        #: ``sagellm.kv_cache.block_hash``).
        self.block_hashes: list[bytes] = []
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.metrics = SequenceMetrics()
        self.output_text = ""
        #: Characters of ``output_text`` already handed to the caller.
        self.num_text_emitted = 0
        self.generator = None  # torch.Generator for seeded sampling, set by the runner

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one token left to compute: a (possibly resumed) prefill."""
        return self.num_uncomputed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"SequenceState({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
