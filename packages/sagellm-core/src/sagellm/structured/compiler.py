"""Structured-output params -> a grammar checked against one tokenizer, compiled off the step
loop and cached.

llguidance builds its lexer and parser lazily, so "compiling" a grammar is cheap (about a
millisecond for a JSON schema of a few properties): the grammar text is produced, parsed and
checked against the tokenizer here, and the token-level work happens per step as masks are
computed. The result, a :class:`CompiledGrammar`, holds a pristine matcher that each request
copies (microseconds). Compilation runs on a small shared thread pool (llguidance releases the
GIL while it builds), and results are kept in an LRU cache keyed on the params' canonical text,
so a schema sent by every request of a client compiles once.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance

from sagellm.structured.params import StructuredOutputParams
from sagellm.structured.tokenizer import GuidanceTokenizer, guidance_tokenizer

#: Compiled grammars kept per tokenizer; the least recently used is dropped past this.
MAX_CACHED_GRAMMARS = 512
#: Threads compiling grammars, shared by every compiler of the process.
NUM_COMPILE_THREADS = 2
#: Bound on the whitespace between JSON tokens: free enough for pretty-printed output, bounded
#: so a model cannot spend its whole budget on newlines inside a constrained object.
JSON_WHITESPACE_PATTERN = r"[\x20\x0A\x0D\x09]{0,20}"
#: Longest grammar-engine error text passed on to the client.
MAX_ERROR_CHARS = 1000
#: llguidance's resource limits (lexer fuel, Earley items per step, grammar size): its defaults,
#: each of which bounds a hostile grammar to milliseconds per step, with terse errors that do
#: not echo parser state.
PARSER_LIMITS = dict(verbose_errors=False)


def json_options(strict: bool) -> dict[str, object]:
    """llguidance's JSON-compiler options for a schema (also used by ``tools``)."""
    return {"whitespace_pattern": JSON_WHITESPACE_PATTERN, "lenient": not strict}


def grammar_text(params: StructuredOutputParams) -> str:
    """The llguidance grammar for ``params`` (tokenizer-free; not yet checked)."""
    kind = params.kind
    if kind in ("json_schema", "json_object"):
        schema = params.json_schema if kind == "json_schema" else {"type": "object"}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(
                schema, overrides=json_options(params.strict))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"json_schema: {_short(str(exc))}") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)  # type: ignore[arg-type]
    if kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(params.grammar)  # type: ignore[arg-type]
    # A Lark string literal takes JSON string escapes, which json.dumps writes.
    alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice or [])
    return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}")


class CompiledGrammar:
    """A grammar checked against one tokenizer; :meth:`new_matcher` starts a request on it."""

    def __init__(self, params: StructuredOutputParams, tokenizer: GuidanceTokenizer,
                 matcher: llguidance.LLMatcher) -> None:
        self.params = params
        self.tokenizer = tokenizer
        self._template = matcher  # never advanced; requests advance copies

    def new_matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles :class:`StructuredOutputParams` for one tokenizer, with an LRU cache.

    ``compile_async`` returns a ``concurrent.futures.Future`` (already resolved on a cache hit)
    so the engine never waits on a compile inside its step loop; ``compile`` and ``validate``
    are the blocking forms (the server calls ``validate`` in a worker thread before admitting a
    request). A params the engine cannot enforce raises ``ValueError`` naming the problem; that
    outcome is cached too, so a client repeating a bad schema is refused without recompiling.
    """

    def __init__(self, tokenizer: GuidanceTokenizer, *,
                 max_cached: int = MAX_CACHED_GRAMMARS,
                 executor: ThreadPoolExecutor | None = None) -> None:
        if max_cached < 1:
            raise ValueError(f"max_cached must be at least 1, got {max_cached}")
        self.tokenizer = tokenizer
        self.max_cached = max_cached
        self._executor = executor
        self._cache: OrderedDict[str, Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        #: Grammars actually built (cache misses), and lookups answered from the cache.
        self.num_compiles = 0
        self.num_cache_hits = 0

    def compile_async(self, params: StructuredOutputParams) -> Future[CompiledGrammar]:
        """The compiled grammar for ``params``, as a future; concurrent equal requests share one
        compile."""
        key = params.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return hit
            fut: Future[CompiledGrammar] = Future()
            self._cache[key] = fut
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            self.num_compiles += 1
        (self._executor or shared_executor()).submit(self._run, key, params, fut)
        return fut

    def compile(self, params: StructuredOutputParams,
                timeout: float | None = None) -> CompiledGrammar:
        """Blocking :meth:`compile_async`; raises ``ValueError`` for a grammar it cannot build."""
        return self.compile_async(params).result(timeout)

    def validate(self, params: StructuredOutputParams, timeout: float | None = None) -> None:
        """Raise ``ValueError`` if ``params`` cannot be enforced; warms the cache otherwise."""
        self.compile(params, timeout)

    def num_cached(self) -> int:
        with self._lock:
            return len(self._cache)

    def _run(self, key: str, params: StructuredOutputParams,
             fut: Future[CompiledGrammar]) -> None:
        if not fut.set_running_or_notify_cancel():
            self._forget(key, fut)
            return
        try:
            fut.set_result(self._build(params))
        except ValueError as exc:
            fut.set_exception(exc)  # deterministic: stays cached
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter, not swallowed
            self._forget(key, fut)  # maybe transient (memory): the next request retries
            fut.set_exception(exc)

    def _build(self, params: StructuredOutputParams) -> CompiledGrammar:
        grammar = grammar_text(params)
        matcher = llguidance.LLMatcher(self.tokenizer.ll, grammar, log_level=0,
                                       limits=llguidance.LLParserLimits(**PARSER_LIMITS))
        if matcher.is_error():
            raise ValueError(f"{params.kind}: {_short(matcher.get_error())}")
        return CompiledGrammar(params, self.tokenizer, matcher)

    def _forget(self, key: str, fut: Future[CompiledGrammar]) -> None:
        with self._lock:
            if self._cache.get(key) is fut:
                del self._cache[key]


def compiler_for(tokenizer: object, vocab_size: int | None = None,
                 eos_token_ids: Iterable[int] | None = None) -> GrammarCompiler:
    """The process's :class:`GrammarCompiler` for an HF tokenizer (see ``guidance_tokenizer``
    for the arguments); one per tokenizer, vocabulary size and EOS set."""
    guide = guidance_tokenizer(tokenizer, vocab_size, eos_token_ids)
    with _compilers_lock:
        per_tok = _compilers.setdefault(tokenizer, {})
        key = (guide.vocab_size, guide.eos_token_ids)
        if key not in per_tok:
            per_tok[key] = GrammarCompiler(guide)
        return per_tok[key]


_compilers: weakref.WeakKeyDictionary[object, dict[tuple[int, tuple[int, ...]], GrammarCompiler]] = (
    weakref.WeakKeyDictionary())
_compilers_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def shared_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(NUM_COMPILE_THREADS, thread_name_prefix="sagellm-grammar")
        return _executor


def _short(msg: str) -> str:
    msg = msg.strip()
    return msg if len(msg) <= MAX_ERROR_CHARS else msg[:MAX_ERROR_CHARS] + "..."
