"""Where an engine's ranks are, and which scheduler and runner rank 0 drives them with.

The builder (:mod:`sagellm.engine.builder`) asks a :class:`Layout` for the scheduler and the
runner and passes them to the engine; nothing is replaced afterwards. This class is the
single-rank layout; ``sagellm.distributed`` subclasses it for tensor parallelism and for
prefill/decode disaggregation (the subclasses start the other ranks before the model loads).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from sagellm.config import EngineConfig
from sagellm.engine.model_runner import StepRunner
from sagellm.engine.scheduler import Scheduler
from sagellm.layers.parallel import SINGLE, TPGroup

if TYPE_CHECKING:
    from sagellm.engine.builder import EngineParts


class Workers(Protocol):
    """The other ranks of a multi-rank engine, as the engine sees them."""

    def shutdown(self) -> None: ...


class Layout:
    """One rank: core's scheduler and the platform's runner (or core's)."""

    #: ``SamplingParams`` fields this layout cannot serve at other than their defaults; the
    #: engine refuses a request that sets one, naming it.
    unsupported_params: frozenset[str] = frozenset()

    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE,
                 workers: Workers | None = None) -> None:
        #: The settings this rank builds its model and KV pool with.
        self.config = config
        #: The tensor-parallel group this rank's model is built for.
        self.tp = tp
        #: The other ranks; ``None`` for one rank. With workers a failed step is not retried
        #: one sequence at a time: it has already stopped them.
        self.workers = workers

    def make_scheduler(self, parts: EngineParts) -> Scheduler:
        """Called once, after the KV pool exists."""
        cfg = parts.config
        return Scheduler(parts.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                         cfg.max_prefill_tokens or cfg.max_num_batched_tokens,
                         cfg.max_prefill_tokens_decoding)

    def make_runner(self, parts: EngineParts, scheduler: Scheduler) -> StepRunner:
        """Called once, right after :meth:`make_scheduler` (``scheduler`` is its result)."""
        return parts.make_model_runner()

    def shutdown(self) -> None:
        """Stop the other ranks (idempotent). Called by ``LLMEngine.shutdown`` and at exit."""
        if self.workers is not None:
            self.workers.shutdown()
