"""A request as the engine tracks it."""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sagellm.kv_cache.block_hash import check_cache_salt
from sagellm.sampling_params import MAX_SEED, SamplingParams

if TYPE_CHECKING:
    from sagellm.engine.constraint import TokenConstraint
    from sagellm.outputs import TokenLogprob


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
        # Identity tests: ``self.value`` is a Python-level descriptor, read per token.
        return self is not SequenceStatus.WAITING and self is not SequenceStatus.RUNNING


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

    A request with ``SamplingParams.n > 1`` is one sequence per choice: ``index`` is the choice
    and ``group_id`` the caller's request id (``request_id``, the engine's key for the sequence,
    is ``group_id`` for choice 0 and ``f"{group_id}/{index}"`` for the others).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: frozenset[int] = frozenset(), cache_salt: str | None = None, *,
                 index: int = 0, group_id: str | None = None,
                 constraint: TokenConstraint | None = None) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        #: Only requests with the same salt share cached KV blocks (``None``: the common cache).
        self.cache_salt = check_cache_salt(cache_salt)
        self.request_id = request_id
        self.index = index
        self.group_id = request_id if group_id is None else group_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        #: Leading entries of ``block_table`` that are ``NO_BLOCK``: blocks wholly before the
        #: sliding window, given back while the sequence runs (``BlockManager``).
        self.num_released_blocks = 0
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
        #: Structured output: which tokens may come next (``sagellm.engine.constraint``).
        self.constraint = constraint
        #: Output tokens the constraint has accepted; with asynchronous scheduling the next
        #: step's mask fill may accept a pending token before the engine sees it.
        self.num_accepted_tokens = 0
        #: Why the constraint refused a token the mask fill accepted for it (then the engine
        #: fails the request when it sees the token).
        self.constraint_error: str | None = None
        #: Whether the constraint was complete after the last token it accepted (read by the
        #: engine instead of asking the constraint, which the next mask fill may be reading).
        self.constraint_done = False
        #: Set by the mask fill that accepts this sequence's pending token once it has (the
        #: engine waits for it before it looks at the constraint); ``None`` when none does.
        self.accept_ready: threading.Event | None = None
        #: With ``params.logprobs``: one entry per generated token, appended by the engine.
        self.output_logprobs: list[TokenLogprob] | None = (
            [] if params.logprobs is not None else None)
        #: The runner's logprob of the token it just sampled for this sequence, taken by the
        #: engine with the token (assigned, not appended, so a rerun step overwrites it).
        self.sampled_logprob: TokenLogprob | None = None
        #: With ``params.prompt_logprobs``: one slot per prompt position, filled by the runner
        #: as prefill chunks compute them (slot 0 stays ``None``). Choices > 0 share choice 0's.
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] * self.num_prompt_tokens if params.prompt_logprobs is not None else None)

    @property
    def seed(self) -> int | None:
        """This choice's seed: ``params.seed + index``, wrapped into the seed range."""
        if self.params.seed is None:
            return None
        s = self.params.seed + self.index
        return s - 2**64 if s > MAX_SEED else s

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs are asked for and not all computed yet: every prompt position must
        be run through the model (no prefix-cache hit may skip one)."""
        lps = self.prompt_logprobs
        return lps is not None and self.index == 0 and (len(lps) == 1 or lps[-1] is None)

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
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """More than one token left to compute: a (possibly resumed) prefill."""
        return len(self.token_ids) - self.num_computed_tokens > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"SequenceState({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
