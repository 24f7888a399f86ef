"""GrammarCompiler: every kind compiles, the cache answers repeats without recompiling, and a
params the grammar engine cannot enforce raises a ValueError that names the problem."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sagellm.structured import compiler as mod
from sagellm.structured.compiler import CompiledGrammar, GrammarCompiler, compiler_for
from sagellm.structured.params import StructuredOutputParams as P
from sagellm.structured.tokenizer import guidance_tokenizer
from sagellm.testing.tiny_model import make_tiny_llama

EOS = [2]


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("byte-tok"), tokenizer=True)
    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture
def compiler(byte_tokenizer: Any) -> GrammarCompiler:
    # A fresh compiler per test, so counters start at zero.
    return GrammarCompiler(guidance_tokenizer(byte_tokenizer, 256, EOS))


ALL_KINDS = [
    P(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    P(json_object=True),
    P(regex=r"[0-9]{3}-[a-z]+"),
    P(grammar='start: "(" num ("," num)* ")"\nnum: /[0-9]+/'),
    P(choice=["yes", "no", 'q"uo\\te']),
]


@pytest.mark.parametrize("params", ALL_KINDS, ids=lambda p: p.kind)
def test_every_kind_compiles(compiler: GrammarCompiler, params: P) -> None:
    compiled = compiler.compile(params)
    assert isinstance(compiled, CompiledGrammar) and compiled.params == params
    m = compiled.new_matcher()
    assert not m.is_error() and not m.is_accepting()


def test_cache_hit_does_not_recompile(compiler: GrammarCompiler) -> None:
    a = P(json_schema={"type": "object", "properties": {"x": {}, "y": {}}})
    first = compiler.compile(a)
    assert (compiler.num_compiles, compiler.num_cache_hits) == (1, 0)
    # Equal params written in another key order are the same entry.
    same = P(json_schema={"properties": {"y": {}, "x": {}}, "type": "object"})
    t0 = time.perf_counter()
    fut = compiler.compile_async(same)
    assert fut.done() and fut.result() is first  # resolved on return: no thread hop
    assert time.perf_counter() - t0 < 0.05
    assert (compiler.num_compiles, compiler.num_cache_hits) == (1, 1)
    compiler.compile(P(json_schema=dict(a.json_schema or {}), strict=True))
    assert compiler.num_compiles == 2


def test_concurrent_requests_share_one_compile(compiler: GrammarCompiler) -> None:
    params = P(regex="[a-z]{2,9}")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: compiler.compile(params), range(16)))
    assert all(r is results[0] for r in results)
    assert compiler.num_compiles == 1 and compiler.num_cache_hits == 15


def test_compile_runs_off_the_callers_thread(byte_tokenizer: Any) -> None:
    class Deferred:
        """An executor that runs nothing until told to: the caller is never blocked."""

        def __init__(self) -> None:
            self.jobs: list[Any] = []

        def submit(self, fn: Any, *args: Any) -> None:
            self.jobs.append((fn, args))

    ex = Deferred()
    comp = GrammarCompiler(guidance_tokenizer(byte_tokenizer, 256, EOS), executor=ex)  # type: ignore[arg-type]
    fut = comp.compile_async(P(regex="a+"))
    assert not fut.done() and len(ex.jobs) == 1
    fn, args = ex.jobs.pop()
    fn(*args)
    assert fut.done() and fut.exception() is None


def test_the_shared_pool_names_its_threads(compiler: GrammarCompiler) -> None:
    seen: list[str] = []
    real = compiler._build

    def spy(params: P) -> CompiledGrammar:
        seen.append(threading.current_thread().name)
        return real(params)

    compiler._build = spy  # type: ignore[method-assign]
    compiler.compile(P(regex="b+"))
    assert seen and seen[0].startswith("sagellm-grammar")


def test_lru_bound(byte_tokenizer: Any) -> None:
    comp = GrammarCompiler(guidance_tokenizer(byte_tokenizer, 256, EOS), max_cached=2)
    a, b, c = P(regex="a"), P(regex="b"), P(regex="c")
    comp.compile(a)
    comp.compile(b)
    comp.compile(a)  # a is now the most recent
    comp.compile(c)  # evicts b
    assert comp.num_cached() == 2 and comp.num_compiles == 3
    comp.compile(a)
    assert comp.num_compiles == 3
    comp.compile(b)
    assert comp.num_compiles == 4
    with pytest.raises(ValueError, match="max_cached"):
        GrammarCompiler(comp.tokenizer, max_cached=0)


@pytest.mark.parametrize("params, problem", [
    (P(regex="a("), "regex: .*unclosed group"),
    (P(grammar="start: foo"), "grammar: .*unknown name"),
    (P(grammar="this is not lark"), "grammar: .*Expected token"),
    (P(json_schema={"type": "nonsense"}), "json_schema: .*Invalid type"),
    (P(json_schema={"$ref": "#/$defs/missing"}), "json_schema: .*does not exist"),
    (P(json_schema={"type": "string", "minLength": 10, "maxLength": 5}), "Unsatisfiable"),
    (P(json_schema={"type": "string", "pattern": "a("}), "json_schema: .*regex"),
    (P(json_schema={"type": "object", "if": {"required": ["a"]}}, strict=True),
     r'Unimplemented keys: \["if"\]'),
    (P(json_schema={"type": "array", "contains": {"type": "integer"}}, strict=True),
     "Unimplemented keys"),
], ids=lambda x: x.kind if isinstance(x, P) else "")
def test_bad_params_raise_a_clear_value_error(compiler: GrammarCompiler, params: P,
                                              problem: str) -> None:
    with pytest.raises(ValueError, match="(?s)" + problem) as info:
        compiler.validate(params)
    assert len(str(info.value)) <= mod.MAX_ERROR_CHARS + 50
    # Deterministic failures are cached: a repeat is refused without recompiling.
    with pytest.raises(ValueError, match="(?s)" + problem):
        compiler.compile(params)
    assert compiler.num_compiles == 1


def test_unsupported_keywords_are_ignored_when_not_strict(compiler: GrammarCompiler) -> None:
    compiler.validate(P(json_schema={"type": "object", "if": {"required": ["a"]}}))
    compiler.validate(P(json_schema={"type": "array", "contains": {"type": "integer"}}))


def test_hostile_but_bounded_inputs_compile_quickly(compiler: GrammarCompiler) -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(30):  # 60 levels of schema document: just inside MAX_SCHEMA_DEPTH
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1500)}}
    for params in [P(json_schema=deep), P(json_schema=wide), P(regex="(a{1000}){1000}"),
                   P(json_schema={"anyOf": [{"type": "string", "pattern": f"^{i}[a-z]{{5,40}}$"}
                                            for i in range(500)]})]:
        t0 = time.perf_counter()
        compiler.validate(params)
        assert time.perf_counter() - t0 < 5.0, params.kind


def test_a_transient_failure_is_not_cached(compiler: GrammarCompiler, monkeypatch: Any) -> None:
    calls = []
    real = compiler._build

    def flaky(params: P) -> CompiledGrammar:
        calls.append(params)
        if len(calls) == 1:
            raise MemoryError("out of memory")
        return real(params)

    monkeypatch.setattr(compiler, "_build", flaky)
    with pytest.raises(MemoryError):
        compiler.compile(P(regex="z"))
    compiler.compile(P(regex="z"))
    assert len(calls) == 2


def test_a_cancelled_compile_is_forgotten(compiler: GrammarCompiler) -> None:
    fut: Future[CompiledGrammar] = Future()
    key = P(regex="q").cache_key()
    compiler._cache[key] = fut
    fut.cancel()
    compiler._run(key, P(regex="q"), fut)
    assert compiler.num_cached() == 0


def test_compiler_for_is_cached_per_tokenizer(byte_tokenizer: Any, tmp_path: Path) -> None:
    a = compiler_for(byte_tokenizer, 256, EOS)
    assert compiler_for(byte_tokenizer, 256, EOS) is a
    assert compiler_for(byte_tokenizer, 320, EOS) is not a
    assert compiler_for(byte_tokenizer, 256, [2, 3]) is not a
