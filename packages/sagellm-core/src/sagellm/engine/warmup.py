"""The start-up warm-up: synthetic requests run through the engine before it serves.

A backend whose kernels compile the first time each shape class runs (Triton's JIT on CUDA)
would otherwise compile them while the first real requests wait: hundreds of milliseconds per
kernel variant, paid by the first burst of prompts, the first penalized or grammar-constrained
batch, the first request with logprobs. The warm-up makes each kind of step that traffic makes
run once, in a few waves of short requests:

- ``plain``: a burst of greedy prompts of assorted lengths (a step of several prompts, then
  decodes of the whole batch and of fewer rows as the requests end at different lengths), a
  single prompt, a prompt that shares a cached prefix with an earlier one, and prompts that
  arrive while others decode (prefill and decode rows in one step);
- ``sampling``: rows that sample (temperature, top-p/k, min-p, a seed), penalties, logit bias,
  logprobs and prompt logprobs, ``n > 1``, mixed with greedy rows and alone in their batch;
- ``grammar`` (a model with a tokenizer): JSON-schema and regex constrained rows, which also
  builds the grammar engine's view of the vocabulary once.

Afterwards nothing of it is left: its prefix-cache blocks go back to the pool and the counters
that :meth:`~sagellm.engine.llm_engine.LLMEngine.get_stats` reports (tokens, prefix-cache
queries and hits, evictions, preemptions) read zero again; ``num_steps`` keeps counting, since
step ids must stay unique. A warm-up that fails (a fatal device error aside) is logged and the
engine serves anyway: a kernel that fails here would fail the request that needs it, not the
engine.

``EngineConfig.warmup`` chooses: ``None`` (the default) warms up where the platform's
``Capabilities.compiles_on_first_use`` is true.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sagellm.prompt_validation import PromptError
from sagellm.sampling_params import SamplingParams
from sagellm.structured.params import StructuredOutputParams

if TYPE_CHECKING:
    from sagellm.engine.llm_engine import LLMEngine

logger = logging.getLogger("sagellm.engine.warmup")

#: Request ids of the warm-up start with this (never a client's: the engine's own ids are
#: ``req-N`` and the server's are random).
REQUEST_PREFIX = "sagellm-warmup-"
#: Rows of the warm-up's largest batch: every graph and kernel specialisation by row count
#: that real traffic reaches first (one row, a few, a multiple of 16) is covered by 16.
MAX_BATCH = 16
#: Tokens each warm-up request generates (enough for decode steps on shrinking batches).
MAX_TOKENS = 4
#: A runaway guard: the waves need a few dozen steps.
MAX_STEPS = 400
#: The grammar wave's schema (tiny: the point is the masks' kernels, not the compile).
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}


@dataclass
class WarmupReport:
    """What the warm-up ran: requests per wave, steps, seconds, and whether it completed."""

    requests: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def num_requests(self) -> int:
        return sum(self.requests.values())


def use_warmup(engine: LLMEngine) -> bool:
    """Whether ``engine`` warms up: as ``config.warmup`` says, ``None`` meaning where its
    platform compiles kernels on first use."""
    mode = engine.config.warmup
    if mode is not None:
        return mode
    return engine.platform.capabilities().compiles_on_first_use


def prompt_lengths(n: int, max_len: int, budget: int) -> list[int]:
    """``n`` assorted prompt lengths (odd ones and multiples of 16 mixed), each at most
    ``max_len`` and all together at most ``budget`` tokens (scaled down to fit; fewer than
    ``n`` only if the budget cannot hold ``n`` prompts of 2 tokens)."""
    n = min(n, budget // 2)
    raw = [min(max_len, 17 + 23 * i if i % 3 else 32 + 16 * i) for i in range(n)]
    total = sum(raw)
    if total > budget:
        raw = [max(2, length * budget // total) for length in raw]
        while sum(raw) > budget:  # the floor of 2 can overshoot by a few tokens
            raw[raw.index(max(raw))] -= 1
    return [max(2, length) for length in raw]


class _Waves:
    """Builds and runs the waves against one engine."""

    def __init__(self, engine: LLMEngine, report: WarmupReport) -> None:
        self.engine = engine
        self.report = report
        cfg = engine.config
        #: Room for a prompt and its tokens in the context.
        self.max_prompt = max(2, engine.max_model_len - MAX_TOKENS - 1)
        self.batch = max(1, min(MAX_BATCH, cfg.max_num_seqs))
        # The first burst is one step's prefill: as many prompt tokens as a step may take.
        step_prefill = getattr(engine.scheduler, "max_prefill_tokens", cfg.max_num_batched_tokens)
        self.budget = max(2, min(cfg.max_num_batched_tokens, step_prefill) - self.batch)
        # Token ids from the low part of the vocabulary minus the EOS ids, so that no prompt is
        # refused and no request ends on its first token by chance (ignore_eos covers outputs).
        self.rng = random.Random(1234)
        top = max(2, min(engine.vocab_size, 32000))
        self.ids = [t for t in range(1, top) if t not in engine.eos_token_ids] or [0]
        self.next = 0

    def prompt(self, length: int) -> list[int]:
        return [self.rng.choice(self.ids) for _ in range(min(length, self.max_prompt))]

    def add(self, wave: str, prompt: list[int], params: SamplingParams) -> bool:
        """Queue one request (``False``: this engine refuses its parameters, so it is left
        out: a layout without logprobs, say)."""
        engine = self.engine
        try:
            engine.validate_prompt(prompt, params)
        except PromptError as exc:
            logger.debug("warm-up leaves out a %s request: %s", wave, exc)
            return False
        engine.add_request(prompt, params, request_id=f"{REQUEST_PREFIX}{self.next}")
        self.next += 1
        self.report.requests[wave] = self.report.requests.get(wave, 0) + 1
        return True

    def run(self, then: Callable[[int], None] | None = None) -> None:
        """Step until no request is left (``then(k)`` after the k-th step, to add arrivals)."""
        engine = self.engine
        k = 0
        while engine.has_unfinished_requests():
            if self.report.steps >= MAX_STEPS:
                raise RuntimeError(f"the warm-up did not finish in {MAX_STEPS} steps")
            for out in engine.step():
                if out.finished and out.error is not None:
                    raise RuntimeError(f"warm-up request {out.request_id} failed: {out.error}")
            self.report.steps += 1
            k += 1
            if then is not None:
                then(k)
        self.drain()

    def drain(self) -> None:
        """Wait for a step still queued behind requests that all ended (asynchronous
        scheduling queues one ahead)."""
        pipeline = self.engine.pipeline
        while pipeline is not None and pipeline.inflight is not None:
            self.engine.step()
            self.report.steps += 1

    def params(self, **kw: object) -> SamplingParams:
        base: dict[str, object] = {"max_tokens": MAX_TOKENS, "ignore_eos": True,
                                   "temperature": 0.0}
        return SamplingParams(**{**base, **kw})  # type: ignore[arg-type]

    def plain(self) -> None:
        lengths = prompt_lengths(self.batch, self.max_prompt, self.budget)
        first = self.prompt(lengths[0] if lengths else 2)
        prompts = [first] + [self.prompt(n) for n in lengths[1:]]
        for i, p in enumerate(prompts):
            # All decode together for a few steps, then the batch shrinks as lengths run out.
            self.add("plain", p, self.params(max_tokens=MAX_TOKENS + i % 4))

        def arrivals(k: int) -> None:
            if k == 1:  # prompts joining running decodes; one reuses the first's cached blocks
                self.add("plain", first + self.prompt(7), self.params())
                self.add("plain", self.prompt(45), self.params())

        self.run(arrivals)
        self.add("plain", self.prompt(100), self.params())  # a prompt alone
        self.run()

    def sampling(self) -> None:
        lengths = prompt_lengths(self.batch, self.max_prompt, self.budget)
        variants: list[dict[str, object]] = [
            {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 7},
            {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1},
            {"logprobs": 5},
            {"temperature": 1.0, "min_p": 0.05, "logit_bias": {self.ids[0]: 1.0}},
            {},
        ]
        for i, n in enumerate(lengths):
            self.add("sampling", self.prompt(n), self.params(**variants[i % len(variants)]))
        self.add("sampling", self.prompt(33), self.params(prompt_logprobs=2, logprobs=1))
        self.add("sampling", self.prompt(40), self.params(n=2, temperature=0.7, seed=3))
        self.run()
        # Each feature alone in a batch (every row takes the same path).
        for kw in variants[:4]:
            for n in lengths[:3]:
                self.add("sampling", self.prompt(n), self.params(**kw))
            self.run()

    def grammar(self) -> None:
        if self.engine.tokenizer is None:
            return
        lengths = prompt_lengths(self.batch, self.max_prompt, self.budget)
        json_params = StructuredOutputParams(json_schema=SCHEMA)
        for i, n in enumerate(lengths):
            so = json_params if i % 4 else StructuredOutputParams(regex=r"[a-z]{1,12}")
            self.add("grammar", self.prompt(n), self.params(structured_output=so,
                                                            ignore_eos=False))
        self.run()

    def waves(self) -> Iterator[Callable[[], None]]:
        yield self.plain
        yield self.sampling
        yield self.grammar


def warm_up(engine: LLMEngine) -> WarmupReport:
    """Run the warm-up waves through ``engine`` and leave no trace of them (see the module
    doc). A platform-fatal error propagates; any other failure is logged and reported."""
    report = WarmupReport()
    t0 = time.perf_counter()
    waves = _Waves(engine, report)
    try:
        for wave in waves.waves():
            wave()
    except Exception as exc:
        if engine.platform.is_fatal_error(exc):
            raise
        report.error = f"{type(exc).__name__}: {exc}"
        logger.warning("the start-up warm-up failed (%s); the engine serves anyway, and its first "
                       "requests may wait for kernels to compile", report.error)
        for rid in list(engine._groups):
            if rid.startswith(REQUEST_PREFIX):
                engine.abort_request(rid)
        try:
            waves.drain()
        except Exception as exc2:  # noqa: BLE001 - already reporting the first failure
            if engine.platform.is_fatal_error(exc2):
                raise
    _forget(engine)
    report.seconds = time.perf_counter() - t0
    return report


def _forget(engine: LLMEngine) -> None:
    """Zero what the warm-up counted and give its cached blocks back."""
    bm = engine.block_manager
    bm.reset_prefix_cache()
    bm.num_cache_queries = bm.num_cache_hits = bm.num_partial_hit_tokens = 0
    bm.num_evicted_blocks = 0
    engine.scheduler.num_preemptions = 0
    engine.num_prompt_tokens = engine.num_generation_tokens = 0
