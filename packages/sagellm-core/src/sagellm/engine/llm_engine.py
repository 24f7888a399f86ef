"""The engine: requests in, one scheduled and executed step per ``step()`` call.

Steps wait for the device one by one, or, with asynchronous scheduling
(``EngineConfig.async_scheduling``), one step is queued ahead of the one being waited for
(``sagellm.engine.async_steps``).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable
from collections.abc import Sequence as Seq

from sagellm.config import EngineConfig
from sagellm.engine.async_steps import StepPipeline, use_async_scheduling
from sagellm.engine.builder import assemble
from sagellm.engine.constraint import ConstraintFactory, refusal
from sagellm.engine.detokenizer import IncrementalDetokenizer
from sagellm.engine.generator_state import restore_generators, save_generators
from sagellm.engine.layout import Layout
from sagellm.engine.plan import StepPlan
from sagellm.engine.sequence import SequenceState, SequenceStatus
from sagellm.engine.stats import EngineStats
from sagellm.engine.step_launch import PENDING_TOKEN
from sagellm.engine.warmup import WarmupReport, use_warmup, warm_up
from sagellm.kv_cache.block_hash import check_cache_salt
from sagellm.outputs import RequestMetrics, RequestOutput
from sagellm.plugins import Registry, get_registry
from sagellm.prompt_validation import PromptError, validate_params, validate_prompt
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
        #: Every live sequence by its own id (``SequenceState.request_id``).
        self._seqs: dict[str, SequenceState] = {}
        #: A request's live sequences (one per choice) by the caller's request id.
        self._groups: dict[str, list[SequenceState]] = {}
        #: Choices 1 .. n-1 waiting for choice 0's prefill, to fork from it (``_fork``).
        self._unforked: dict[str, list[SequenceState]] = {}
        #: Requests whose structured-output grammar is still compiling, not yet scheduled.
        self._compiling: dict[str, object] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._prompts: dict[str, str | None] = {}
        self._next_id = 0
        #: With asynchronous scheduling: the steps queued ahead (``None``: steps wait one by one).
        self.pipeline = StepPipeline(self) if use_async_scheduling(self) else None
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        #: What the start-up warm-up ran (``None``: no warm-up; ``sagellm.engine.warmup``).
        self.warmup: WarmupReport | None = warm_up(self) if use_warmup(self) else None
        self.startup_seconds = time.perf_counter() - t0
        bs = self.config.block_size
        logger.info("engine ready in %.1f s: backend %s (%s), model %s, dtype %s, KV pool %d blocks "
                    "x %d tokens = %d tokens, %s, %s", self.startup_seconds, platform.name,
                    platform.device_name(), parts.loaded.source, parts.loaded.dtype,
                    self.kv.num_blocks, bs, self.kv.num_blocks * bs,
                    "asynchronous scheduling" if self.pipeline is not None
                    else "steps waited for one by one", _warmup_words(self.warmup))
        self._notify_started()

    @property
    def async_scheduling(self) -> bool:
        """Whether :meth:`step` queues the next step before it waits (``sagellm.engine.async_steps``)."""
        return self.pipeline is not None

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
        """Raise :class:`~sagellm.prompt_validation.PromptError` for a prompt or parameters this
        engine cannot serve (``param`` names the field when it is not the prompt)."""
        validate_prompt(token_ids, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        validate_params(params, vocab_size=self.vocab_size)
        for name in sorted(self.layout.unsupported_params):
            if getattr(params, name) != SamplingParams.model_fields[name].default:
                raise PromptError(f"{name} is not supported by this engine's layout "
                                  f"({type(self.layout).__name__})", "invalid_value", param=name)

    def add_request(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                    request_id: str | None = None,
                    constraint: ConstraintFactory | None = None,
                    cache_salt: str | None = None) -> str:
        """Queue a request; returns its id.

        ``cache_salt``: only requests with the same salt share cached prefix KV (say, one per
        tenant); at most ``MAX_CACHE_SALT_CHARS`` characters, ``None`` for the common cache.

        With ``params.n > 1`` the request is ``n`` sequences: choice 0 prefills the prompt and
        the others fork from it (sharing its KV blocks) when that prefill is done; all outputs
        carry ``request_id`` and their choice's ``index``, and :meth:`abort_request` ends them
        all. ``constraint`` (structured output) is called once per choice for its
        :class:`~sagellm.engine.constraint.TokenConstraint`.
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
        ids = [request_id] + [f"{request_id}/{i}" for i in range(1, params.n)]
        for sid in [request_id, *ids]:
            if sid in self._seqs or sid in self._groups:
                raise ValueError(f"request id {sid!r} is already in use")
        compiling = None
        if params.structured_output is not None and constraint is None:
            constraint = compiling = self._grammar_factory(params)
            if compiling.done():  # cached (or failed: then the call below raises, here)
                compiling = None
        seqs = [SequenceState(sid, token_ids, params, self.eos_token_ids, cache_salt, index=i,
                              group_id=request_id,
                              constraint=constraint() if constraint is not None
                              and compiling is None else None)
                for i, sid in enumerate(ids)]
        if compiling is None:
            self.scheduler.add(seqs[0])
        else:
            # The grammar compiles on sagellm.structured's threads; the step loop never waits
            # for it: the request is scheduled by the first step after it is ready.
            self._compiling[request_id] = compiling
        for seq in seqs:
            self._seqs[seq.request_id] = seq
            if self.tokenizer is not None:
                self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer, seq)
        self._groups[request_id] = seqs
        if len(seqs) > 1:
            self._unforked[request_id] = seqs[1:]
        self._prompts[request_id] = text
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Abort every choice of ``request_id``; ``False`` if none was unfinished."""
        group = self._groups.get(request_id)
        if group is None:
            return False
        self._compiling.pop(request_id, None)
        for seq in list(group):
            self.scheduler.abort(seq.request_id)  # an unforked choice is not scheduled yet
            self._forget(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        # A queued step whose requests all ended is not work left: the next step waits for it.
        return (self.scheduler.has_unfinished() or bool(self._compiling)
                or (self.pipeline is not None and self.pipeline.has_live_work()))

    def _grammar_factory(self, params: SamplingParams):  # type: ignore[no-untyped-def]
        """The constraint factory of ``params.structured_output`` (compiling in the background;
        a model without the tokenizer a grammar needs raises ``ValueError`` here)."""
        from sagellm.structured.factory import make_constraint_factory

        return make_constraint_factory(params.structured_output, self.tokenizer,
                                       self.vocab_size, self.eos_token_ids)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Schedule the requests whose grammar finished compiling; fail those whose grammar did
        not compile (only them). Waits a moment when nothing else could run this step."""
        if not self.scheduler.has_unfinished():
            import concurrent.futures

            concurrent.futures.wait([f.future for f in self._compiling.values()], timeout=0.005,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        outputs: list[RequestOutput] = []
        for rid, factory in list(self._compiling.items()):
            if not factory.done():
                continue
            del self._compiling[rid]
            seqs = list(self._groups.get(rid, []))
            try:
                for seq in seqs:
                    seq.constraint = factory()
            except Exception as exc:  # noqa: BLE001 - that request's grammar, not the engine
                if seqs:
                    outputs.extend(self._fail(seqs[0], exc))
                continue
            if seqs:
                self.scheduler.add(seqs[0])
        return outputs

    def _forget(self, seq: SequenceState) -> None:
        self._seqs.pop(seq.request_id, None)
        self._detok.pop(seq.request_id, None)
        group = self._groups.get(seq.group_id)
        if group is not None:
            if seq in group:
                group.remove(seq)
            if not group:
                del self._groups[seq.group_id]
                self._prompts.pop(seq.group_id, None)
                self._unforked.pop(seq.group_id, None)

    def _fork(self, plan: StepPlan) -> None:
        """Fork the waiting choices of requests whose choice 0 finished its prefill this step
        (committed, so its blocks hold the prompt; before any of them can be freed)."""
        for op in plan.prefills:
            if not op.samples:
                continue
            children = self._unforked.pop(op.seq.request_id, None)
            if not children:
                continue
            for child in children:
                self.block_manager.fork(op.seq, child)
                child.prompt_logprobs = op.seq.prompt_logprobs
            self.scheduler.add_forked(children)

    # -- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; returns an output per request that progressed or ended.

        One request's failure does not stop the engine: if the step raises, it is run again one
        sequence at a time and only the sequences whose own run raises are finished with
        ``finish_reason == "error"`` (``RequestOutput.error`` says why); the same holds for an
        error while turning one sequence's token into output. An error the platform calls fatal
        (``Platform.is_fatal_error``: a lost device) propagates.
        """
        outputs = self._admit_compiled() if self._compiling else []
        if self.pipeline is not None:
            return outputs + self.pipeline.step()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs
        return outputs + self._run(plan)

    def _run(self, plan: StepPlan) -> list[RequestOutput]:
        """Run ``plan`` and wait for it (a failing request fails alone), commit, advance."""
        tokens, failed = self._execute(plan)
        outputs = [out for seq, exc in failed for out in self._fail(seq, exc)]
        if failed:
            plan = plan.without({seq.request_id for seq, _ in failed})
        self._commit(plan)
        return outputs + self._advance_each(
            (seq, tokens[seq.request_id], None) for seq in plan.sampling_seqs())

    def _advance_each(self, rows: Iterable[tuple[SequenceState, int, int | None]]
                      ) -> list[RequestOutput]:
        """:meth:`_advance` each ``(sequence, token, placeholder index)``; a row that raises
        fails alone (its output holds only what the caller was already given)."""
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for seq, tok, index in rows:
            num_tokens = seq.num_tokens if index is None else index
            try:
                outputs.append(self._advance(seq, tok, now, index))
            except Exception as exc:
                if self.platform.is_fatal_error(exc):
                    raise
                outputs.extend(self._fail(seq, exc, num_tokens))
        return outputs

    def _commit(self, plan: StepPlan) -> None:
        """Mark ``plan``'s tokens computed (hashing the blocks they filled), fork the choices
        waiting for a prompt it finished, count its prompt tokens."""
        self.scheduler.commit(plan)
        if self._unforked:
            self._fork(plan)
        self.num_prompt_tokens += sum(op.num_tokens for op in plan.prefills
                                      if op.start < op.seq.num_prompt_tokens)

    def _execute(self, plan: StepPlan) -> tuple[dict[str, int], list[tuple[SequenceState, Exception]]]:
        """Run ``plan``: the sampled token per request id, and the sequences that failed.

        Nothing is committed yet when this runs, so after a failure every op can run again on
        its own: its KV writes go to the same slots with the same values.
        """
        seqs = plan.sampling_seqs()
        generators = save_generators(seqs)
        try:
            return dict(zip((s.request_id for s in seqs), self.runner.execute(plan))), []
        except Exception as exc:
            # A multi-rank step that raised has already stopped the other ranks.
            if self.workers is not None or self.platform.is_fatal_error(exc):
                raise
            logger.warning("step %d failed (%s: %s); running its %d sequences one at a time to "
                           "find the failing ones", plan.step_id, type(exc).__name__, exc,
                           len(plan.prefills) + len(plan.decodes))
        restore_generators(generators)  # seeded requests draw the same numbers again
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

    def _advance(self, seq: SequenceState, tok: int, now: float, index: int | None = None
                 ) -> RequestOutput:
        """Append the sampled token (or write it over its placeholder at ``index``) and its
        logprob, let the constraint accept it, detokenize, check stop conditions, build the
        output."""
        if index is None:
            seq.append_token(tok)
        elif index != seq.num_tokens - 1 or seq.token_ids[index] != PENDING_TOKEN:
            raise RuntimeError(f"no pending token at {index} for sampled token {tok}")
        else:
            seq.token_ids[index] = tok
        if seq.output_logprobs is not None:
            lp, seq.sampled_logprob = seq.sampled_logprob, None
            if lp is None or lp.token_id != tok:
                raise RuntimeError(f"the runner gave no logprob for sampled token {tok}")
            seq.output_logprobs.append(lp)
        if seq.constraint is not None:
            ready, seq.accept_ready = seq.accept_ready, None
            if ready is not None:  # the next step's mask fill accepts this token
                ready.wait()
            if seq.constraint_error is not None:  # refused by the next step's mask fill
                raise ValueError(seq.constraint_error)
            if seq.num_accepted_tokens < seq.num_output_tokens:
                if not seq.constraint.accept_token(tok):
                    raise ValueError(refusal(seq.constraint, tok))
                seq.num_accepted_tokens += 1
                seq.constraint_done = seq.constraint.is_terminated()
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
            self._forget(seq)
        return out

    def _fail(self, seq: SequenceState, exc: Exception, num_tokens: int | None = None
              ) -> list[RequestOutput]:
        """Finish ``seq`` with an error: free its blocks, log once, return its last output
        (and one for each choice still waiting to fork from it, which fails with it).

        ``num_tokens`` is its length before the failed step, so the output holds only tokens
        and text the caller has already been given.
        """
        logger.error("request %s failed, the engine goes on without it: %s: %s",
                     seq.request_id, type(exc).__name__, exc, exc_info=exc)
        seq.metrics.finished_time = time.monotonic()
        self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)
        if num_tokens is not None:
            del seq.token_ids[num_tokens:]
        if seq.output_logprobs is not None:
            del seq.output_logprobs[seq.num_output_tokens:]
        seq.output_text = seq.output_text[: seq.num_text_emitted]
        outs = [self._output(seq, [], "", True)]
        self._forget(seq)
        if seq.index == 0:
            for child in self._unforked.pop(seq.group_id, []):
                child.status = SequenceStatus.FINISHED_ERROR
                outs.append(self._output(child, [], "", True))
                self._forget(child)
        for out in outs:
            out.error = f"{type(exc).__name__}: {exc}"
        return outs

    def _detokenize(self, seq: SequenceState) -> None:
        detok = self._detok.get(seq.request_id)
        if detok is not None:
            seq.output_text += detok.step(seq.token_ids)

    def _check_stop(self, seq: SequenceState, tok: int) -> None:
        p = seq.params
        n_out = seq.num_output_tokens
        if seq.constraint is not None and seq.constraint_done:
            seq.status = SequenceStatus.FINISHED_STOPPED
            return
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
        lps = seq.output_logprobs
        return RequestOutput(
            request_id=seq.group_id,
            prompt=self._prompts.get(seq.group_id),
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
            index=seq.index,
            new_logprobs=None if lps is None else lps[len(lps) - len(new_ids):],
            prompt_logprobs=seq.prompt_logprobs,
            _all_logprobs=lps,
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


def _warmup_words(report: WarmupReport | None) -> str:
    if report is None:
        return "no warm-up"
    if report.error is not None:
        return f"warm-up failed after {report.seconds:.1f} s ({report.error})"
    return (f"warm-up of {report.num_requests} requests in {report.steps} steps, "
            f"{report.seconds:.1f} s")


def _one_by_one(plan: StepPlan) -> list[StepPlan]:
    """One plan per op of ``plan``."""
    subs = [StepPlan(plan.step_id, prefills=[op]) for op in plan.prefills]
    subs += [StepPlan(plan.step_id, decodes=[op]) for op in plan.decodes]
    return subs
