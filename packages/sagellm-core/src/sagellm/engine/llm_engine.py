"""The synchronous engine: requests in, one scheduled and executed step per ``step()`` call."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence as Seq

import torch

from sagellm.config import EngineConfig
from sagellm.engine.builder import assemble
from sagellm.engine.detokenizer import IncrementalDetokenizer
from sagellm.engine.layout import Layout
from sagellm.engine.plan import StepPlan
from sagellm.engine.sequence import SequenceState, SequenceStatus
from sagellm.engine.stats import EngineStats
from sagellm.kv_cache.block_hash import check_cache_salt
from sagellm.outputs import RequestMetrics, RequestOutput
from sagellm.plugins import Registry, get_registry
from sagellm.prompt_validation import validate_prompt
from sagellm.protocols import Platform
from sagellm.sampling_params import SamplingParams

logger = logging.getLogger("sagellm.engine")


class LLMEngine:
    """Requests in, one scheduled and executed step per :meth:`step` call.

    ``LLMEngine(config)`` (or keyword arguments of :class:`~sagellm.config.EngineConfig`) picks
    the backend (``registry``/``platform`` override the choice) and the layout (one rank,
    tensor-parallel or disaggregated; ``layout`` overrides it), and gets every part from
    :func:`~sagellm.engine.builder.assemble`.
    """

    def __init__(self, config: EngineConfig | None = None, *, registry: Registry | None = None,
                 platform: Platform | None = None, layout: Layout | None = None,
                 **kwargs: object) -> None:
        t0 = time.perf_counter()
        config = config or EngineConfig(**kwargs)  # type: ignore[arg-type]
        self.registry = registry or get_registry()
        platform = platform or self.registry.select(config.backend).platform(config.device_index)
        built = assemble(config, platform, layout)
        parts = built.parts
        self.parts = parts
        self.layout = built.layout
        #: The other ranks of a tensor-parallel or disaggregated engine (``sagellm.distributed``).
        self.workers = built.layout.workers
        if self.workers is not None:
            # The workers go when the engine does (or at exit, whichever comes first).
            weakref.finalize(self, built.layout.shutdown)
        self.config = parts.config
        self.platform = platform
        self.device = parts.device
        self.loaded = parts.loaded
        self.model = parts.model
        self.tokenizer = parts.loaded.tokenizer
        self.hf_config = parts.loaded.hf_config
        self.max_model_len = parts.max_model_len
        self.vocab_size = parts.vocab_size
        self.eos_token_ids = parts.eos_token_ids
        self.kv_spec = parts.kv_spec
        self.attention = parts.attention
        self.kv = parts.kv
        self.block_manager = parts.block_manager
        self.scheduler = built.scheduler
        self.runner = built.runner
        self._seqs: dict[str, SequenceState] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._prompts: dict[str, str | None] = {}
        self._next_id = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.startup_seconds = time.perf_counter() - t0
        bs = self.config.block_size
        logger.info("engine ready in %.1f s: backend %s (%s), model %s, dtype %s, KV pool %d blocks "
                    "x %d tokens = %d tokens", self.startup_seconds, platform.name,
                    platform.device_name(), parts.loaded.source, parts.loaded.dtype,
                    self.kv.num_blocks, bs, self.kv.num_blocks * bs)
        self._notify_started()

    def shutdown(self) -> None:
        """Stop the worker processes of a multi-rank engine (a no-op for one rank)."""
        self.layout.shutdown()

    # -- start-up helpers ------------------------------------------------------------------

    def _notify_started(self) -> None:
        info = {"backend": self.platform.name, "model": self.loaded.source,
                "num_kv_blocks": self.kv.num_blocks, "startup_seconds": self.startup_seconds}
        if self.registry.pm is None:
            return
        for impl in self.registry.pm.hook.sagellm_engine_started.get_hookimpls():
            try:
                impl.function(engine_info=info)
            except Exception:
                logger.exception("sagellm_engine_started of %s failed", impl.plugin_name)

    # -- requests --------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids")
        return list(self.tokenizer(prompt).input_ids)  # type: ignore[operator]

    def validate_prompt(self, token_ids: Seq[int], params: SamplingParams) -> None:
        validate_prompt(token_ids, vocab_size=self.vocab_size, max_model_len=self.max_model_len)

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None, cache_salt: str | None = None) -> str:
        """Queue a request; returns its id.

        ``cache_salt``: only requests with the same salt share cached prefix KV (say, one per
        tenant); at most ``MAX_CACHE_SALT_CHARS`` characters, ``None`` for the common cache.
        """
        check_cache_salt(cache_salt)
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = self.tokenize(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        self.validate_prompt(token_ids, params)
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = SequenceState(request_id, token_ids, params, self.eos_token_ids, cache_salt)
        self.scheduler.add(seq)
        self._seqs[request_id] = seq
        self._prompts[request_id] = text
        if self.tokenizer is not None:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, seq)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        self._forget(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def _forget(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)
        self._detok.pop(request_id, None)
        self._prompts.pop(request_id, None)

    # -- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; returns an output per request that progressed or ended.

        One request's failure does not stop the engine: if the step raises, it is run again one
        sequence at a time and only the sequences whose own run raises are finished with
        ``finish_reason == "error"`` (``RequestOutput.error`` says why); the same holds for an
        error while turning one sequence's token into output. An error the platform calls fatal
        (``Platform.is_fatal_error``: a lost device) propagates.
        """
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        tokens, failed = self._execute(plan)
        outputs = [self._fail(seq, exc) for seq, exc in failed]
        if failed:
            plan = _without(plan, {seq.request_id for seq, _ in failed})
        self.scheduler.commit(plan)
        self.num_prompt_tokens += sum(op.num_tokens for op in plan.prefills
                                      if op.start < op.seq.num_prompt_tokens)
        now = time.monotonic()
        for seq in plan.sampling_seqs():
            num_tokens = seq.num_tokens
            try:
                outputs.append(self._advance(seq, tokens[seq.request_id], now))
            except Exception as exc:
                if self.platform.is_fatal_error(exc):
                    raise
                outputs.append(self._fail(seq, exc, num_tokens))
        return outputs

    def _execute(self, plan: StepPlan) -> tuple[dict[str, int], list[tuple[SequenceState, Exception]]]:
        """Run ``plan``: the sampled token per request id, and the sequences that failed.

        Nothing is committed yet when this runs, so after a failure every op can run again on
        its own: its KV writes go to the same slots with the same values.
        """
        seqs = plan.sampling_seqs()
        generators = _save_generators(seqs)
        try:
            return dict(zip((s.request_id for s in seqs), self.runner.execute(plan))), []
        except Exception as exc:
            # A multi-rank step that raised has already stopped the other ranks.
            if self.workers is not None or self.platform.is_fatal_error(exc):
                raise
            logger.warning("step %d failed (%s: %s); running its %d sequences one at a time to "
                           "find the failing ones", plan.step_id, type(exc).__name__, exc,
                           len(plan.prefills) + len(plan.decodes))
        _restore_generators(generators)  # seeded requests draw the same numbers again
        tokens: dict[str, int] = {}
        failed: list[tuple[SequenceState, Exception]] = []
        for sub in _one_by_one(plan):
            seq = (sub.prefills or sub.decodes)[0].seq
            try:
                sampled = self.runner.execute(sub)
            except Exception as exc:
                if self.platform.is_fatal_error(exc):
                    raise
                failed.append((seq, exc))
                continue
            if sampled:
                tokens[seq.request_id] = sampled[0]
        return tokens, failed

    def _advance(self, seq: SequenceState, tok: int, now: float) -> RequestOutput:
        """Append the sampled token, detokenize, check stop conditions, build the output."""
        seq.append_token(tok)
        self.num_generation_tokens += 1
        m = seq.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        self._detokenize(seq)
        self._check_stop(seq, tok)
        finished = seq.status.finished
        if finished:
            m.finished_time = now
            self.scheduler.finish(seq, seq.status)
        new_text = self._emit_text(seq, finished)
        out = self._output(seq, [tok], new_text, finished)
        if finished:
            self._forget(seq.request_id)
        return out

    def _fail(self, seq: SequenceState, exc: Exception, num_tokens: int | None = None) -> RequestOutput:
        """Finish ``seq`` with an error: free its blocks, log once, return its last output.

        ``num_tokens`` is its length before the failed step, so the output holds only tokens
        and text the caller has already been given.
        """
        logger.error("request %s failed, the engine goes on without it: %s: %s",
                     seq.request_id, type(exc).__name__, exc, exc_info=exc)
        seq.metrics.finished_time = time.monotonic()
        self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
        if num_tokens is not None:
            del seq.token_ids[num_tokens:]
        seq.output_text = seq.output_text[: seq.num_text_emitted]
        out = self._output(seq, [], "", True)
        out.error = f"{type(exc).__name__}: {exc}"
        self._forget(seq.request_id)
        return out

    def _detokenize(self, seq: SequenceState) -> None:
        detok = self._detok.get(seq.request_id)
        if detok is not None:
            seq.output_text += detok.step(seq.token_ids)

    def _check_stop(self, seq: SequenceState, tok: int) -> None:
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if tok in p.stop_token_ids:
                seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, tok
                return
            if not p.ignore_eos and tok in seq.eos_token_ids:
                seq.status = SequenceStatus.FINISHED_STOPPED
                return
            if p.stop:
                for s in p.stop:
                    idx = seq.output_text.find(s, max(0, seq.num_text_emitted - len(s)))
                    if idx >= 0:
                        seq.status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, s
                        seq.output_text = seq.output_text[: idx + (len(s) if p.include_stop_str_in_output else 0)]
                        return
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.status = SequenceStatus.FINISHED_LENGTH

    @staticmethod
    def _emit_text(seq: SequenceState, finished: bool) -> str:
        """Text newly safe to show. While running, the last ``max(len(stop)) - 1`` characters
        are held back, since they may turn out to start a stop string."""
        text = seq.output_text
        end = len(text)
        if not finished and seq.params.stop:
            end = max(seq.num_text_emitted, end - max(len(s) for s in seq.params.stop) + 1)
        delta = text[seq.num_text_emitted:end]
        seq.num_text_emitted = end
        return delta

    def _output(self, seq: SequenceState, new_ids: list[int], new_text: str, finished: bool) -> RequestOutput:
        m = seq.metrics
        return RequestOutput(
            request_id=seq.request_id,
            prompt=self._prompts.get(seq.request_id),
            _all_token_ids=seq.token_ids,
            _num_prompt_tokens=seq.num_prompt_tokens,
            _num_tokens=seq.num_tokens,
            text=seq.output_text,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=finished,
            finish_reason=seq.status.value if finished else None,
            stop_reason=seq.stop_reason,
            num_preemptions=seq.num_preemptions,
            metrics=RequestMetrics(m.arrival_time, m.first_scheduled_time, m.first_token_time,
                                   m.last_token_time, m.finished_time),
        )

    def get_stats(self) -> EngineStats:
        b = self.block_manager.stats()
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=b.usage,
            num_kv_blocks=b.num_blocks,
            num_free_kv_blocks=b.num_free_blocks,
            kv_fragmentation=b.fragmentation,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.scheduler.num_steps,
            num_prefix_cache_queries=self.block_manager.num_cache_queries,
            num_prefix_cache_hits=self.block_manager.num_cache_hits,
            num_kv_evictions=self.block_manager.num_evicted_blocks,
        )


def _without(plan: StepPlan, request_ids: set[str]) -> StepPlan:
    """``plan`` less the ops of ``request_ids`` (failed sequences, which are not committed)."""
    return StepPlan(
        step_id=plan.step_id,
        prefills=[op for op in plan.prefills if op.seq.request_id not in request_ids],
        decodes=[op for op in plan.decodes if op.seq.request_id not in request_ids],
        preempted=plan.preempted,
        kv_transfers=[t for t in plan.kv_transfers if t.request_id not in request_ids],
    )


def _one_by_one(plan: StepPlan) -> list[StepPlan]:
    """One plan per op of ``plan``."""
    subs = [StepPlan(plan.step_id, prefills=[op]) for op in plan.prefills]
    subs += [StepPlan(plan.step_id, decodes=[op]) for op in plan.decodes]
    return subs


_GeneratorState = tuple[SequenceState, "torch.Generator | None", "torch.Tensor | None"]


def _save_generators(seqs: list[SequenceState]) -> list[_GeneratorState]:
    """The random state of the seeded sequences, to rewind after a failed step."""
    saved: list[_GeneratorState] = []
    for s in seqs:
        if s.params.seed is not None:
            g = s.generator
            saved.append((s, g, g.get_state() if g is not None else None))
    return saved


def _restore_generators(saved: list[_GeneratorState]) -> None:
    for seq, g, state in saved:
        seq.generator = g
        if g is not None and state is not None:
            g.set_state(state)
