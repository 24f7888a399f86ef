"""The engine's entry point: structured-output params -> per-request constraints."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future

from sagellm.structured.compiler import CompiledGrammar, compiler_for, shared_executor
from sagellm.structured.constraint import GrammarConstraint
from sagellm.structured.params import StructuredOutputParams
from sagellm.structured.tokenizer import cached_guidance_tokenizer


class ConstraintFactory:
    """A grammar being compiled off the step loop; calling it gives a fresh constraint.

    ``done()`` says whether the compile has finished (the engine may hold a request back until
    it has, rather than wait inside a step); ``factory()`` waits for it and returns a new
    :class:`GrammarConstraint`, or raises the compile's ``ValueError``. Each call starts a new
    constraint, so one factory serves the ``n`` sequences of a request.
    """

    def __init__(self, future: Future[CompiledGrammar]) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def __call__(self, timeout: float | None = None) -> GrammarConstraint:
        return GrammarConstraint(self.future.result(timeout))


def make_constraint_factory(params: StructuredOutputParams, tokenizer: object, vocab_size: int,
                            eos_token_ids: Iterable[int] | None = None) -> ConstraintFactory:
    """Start compiling ``params`` for the model; returns at once.

    ``tokenizer`` is ``LLMEngine.tokenizer``, ``vocab_size`` the width of the model's logits
    (``LLMEngine.vocab_size``) and ``eos_token_ids`` the ids that end a sequence
    (``LLMEngine.eos_token_ids``; default: the tokenizer's). Raises ``ValueError`` at once for a
    model the grammar engine cannot serve (no tokenizer, a slow one, no EOS id); a grammar it
    cannot build raises ``ValueError`` when the factory is called. The first grammar of a
    tokenizer also builds the grammar engine's view of it (up to about half a second): that runs
    on the compile threads too, so the caller (the engine's step loop) never waits for it.
    """
    eos = None if eos_token_ids is None else list(eos_token_ids)
    if cached_guidance_tokenizer(tokenizer, vocab_size, eos) is not None:
        return ConstraintFactory(compiler_for(tokenizer, vocab_size, eos).compile_async(params))
    done: Future[CompiledGrammar] = Future()
    done.set_running_or_notify_cancel()

    def build() -> None:
        try:
            inner = compiler_for(tokenizer, vocab_size, eos).compile_async(params)
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which fails alone
            done.set_exception(exc)
            return
        inner.add_done_callback(lambda f: _copy_outcome(f, done))

    shared_executor().submit(build)
    return ConstraintFactory(done)


def _copy_outcome(src: Future[CompiledGrammar], dst: Future[CompiledGrammar]) -> None:
    exc = src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src.result())
