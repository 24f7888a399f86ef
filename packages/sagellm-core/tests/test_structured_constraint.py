"""GrammarConstraint driven with real tokenizers (the embedded SmolLM2's, and a byte-level one):
greedy picks among the allowed tokens of random logits always yield text the constraint admits,
EOS is allowed exactly when the grammar may end, and padding ids are never allowed."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm.structured.bitmask import allocate_bitmask
from sagellm.structured.constraint import GrammarConstraint
from sagellm.structured.factory import ConstraintFactory, make_constraint_factory
from sagellm.structured.params import StructuredOutputParams as P
from sagellm.structured.protocol import TokenConstraint
from sagellm.structured.tokenizer import guidance_tokenizer
from sagellm.testing.structured import drive_constraint, random_logits, schema_errors
from sagellm.testing.tiny_model import make_tiny_llama

#: SmolLM2's logits width padded past its 49152 tokens, as many checkpoints pad embeddings.
PADDED = 49152 + 40

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "pet": {"anyOf": [{"type": "null"}, {"const": "cat"}]},
    },
    "required": ["name", "age", "ok", "tags", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("byte-tok"), tokenizer=True)
    return AutoTokenizer.from_pretrained(str(path))


def constraint(params: P, tok: Any, vocab: int = PADDED, eos: list[int] | None = None
               ) -> GrammarConstraint:
    return make_constraint_factory(params, tok, vocab, eos)()


def text_of(tok: Any, tokens: list[int]) -> str:
    """The text of ``tokens``; an EOS may only be the last one."""
    eos = tok.eos_token_id
    assert eos not in tokens[:-1]
    return tok.decode(tokens[:-1] if tokens[-1] == eos else tokens)


def allowed(c: GrammarConstraint, vocab: int = PADDED) -> set[int]:
    m = allocate_bitmask(1, vocab)
    c.fill_bitmask(m, 0)
    bits = ((m[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return set(bits.nonzero().flatten().tolist())


@pytest.mark.parametrize("seed", [0, 1])
def test_random_logits_yield_a_valid_json_document(smol_tok: Any, seed: int) -> None:
    c = constraint(P(json_schema=SCHEMA, strict=True), smol_tok)
    tokens = drive_constraint(c, PADDED, random_logits(PADDED, seed))
    # Terminated either by an EOS or because the grammar admits nothing more (a closed object).
    assert c.is_terminated() and c.error is None
    value = json.loads(text_of(smol_tok, tokens))
    assert schema_errors(value, SCHEMA) == []
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(value, SCHEMA)


@pytest.mark.parametrize("params, check", [
    (P(regex=r"[0-9]{3}-[a-z]{1,5}"), lambda s: re.fullmatch(r"[0-9]{3}-[a-z]{1,5}", s)),
    (P(choice=["yes", "no", 'q"uo\\te\n é']), lambda s: s in ["yes", "no", 'q"uo\\te\n é']),
    (P(grammar='start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/'),
     lambda s: re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", s)),
], ids=lambda x: x.kind if isinstance(x, P) else "")
def test_random_logits_yield_a_sentence(smol_tok: Any, params: P, check: Any) -> None:
    for seed in range(2):
        tokens = drive_constraint(constraint(params, smol_tok), PADDED, random_logits(PADDED, seed))
        assert check(text_of(smol_tok, tokens)), text_of(smol_tok, tokens)


def test_json_object_accepts_an_object_then_only_eos(smol_tok: Any) -> None:
    c = constraint(P(json_object=True), smol_tok)
    assert smol_tok.eos_token_id not in allowed(c)
    assert all(c.accept_token(t) for t in smol_tok('{"k": [1, 2.5, "x"], "n": null}').input_ids)
    # A closed object admits nothing more: the request finishes (an EOS would still be taken).
    assert allowed(c) == {smol_tok.eos_token_id} and c.is_terminated()
    assert c.accept_token(smol_tok.eos_token_id) and c.is_terminated()
    c2 = constraint(P(json_object=True), smol_tok)
    assert not c2.accept_token(smol_tok("[1]").input_ids[0])  # an array is not an object


def test_eos_allowed_exactly_when_the_grammar_may_end(smol_tok: Any) -> None:
    eos = [smol_tok.eos_token_id, 0]  # a model may name several end ids
    c = constraint(P(regex="ab?"), smol_tok, eos=eos)
    assert not set(eos) & allowed(c)
    (a,) = smol_tok("a").input_ids
    assert c.accept_token(a) and not c.is_terminated()
    now = allowed(c)
    assert set(eos) <= now and smol_tok("b").input_ids[0] in now
    assert c.accept_token(smol_tok("b").input_ids[0])
    assert allowed(c) == set(eos)
    assert c.accept_token(0) and c.is_terminated()


def test_padding_ids_are_never_allowed(smol_tok: Any) -> None:
    assert len(smol_tok) < PADDED
    c = constraint(P(regex="(?s:.{1,40})"), smol_tok)  # any text: the widest mask there is
    first = allowed(c)
    assert len(first) > 40_000 and max(first) < len(smol_tok)
    assert not c.accept_token(len(smol_tok) + 3)  # a padding id: the grammar engine refuses it
    assert c.is_terminated() and c.error
    c = constraint(P(regex="a"), smol_tok)
    assert not c.accept_token(PADDED)  # past the logits: refused before the grammar engine
    assert c.is_terminated() and "outside" in (c.error or "")


def test_a_refused_token_terminates_with_an_error(smol_tok: Any) -> None:
    c = constraint(P(regex="[0-9]+"), smol_tok)
    assert c.error is None
    assert not c.accept_token(smol_tok("x").input_ids[0])
    assert c.is_terminated() and c.error
    assert allowed(c) == {smol_tok.eos_token_id}
    assert not c.accept_token(smol_tok("1").input_ids[0])
    assert not c.accept_token(-1)


def test_bitmask_shape_checks_and_other_rows_untouched(smol_tok: Any) -> None:
    c = constraint(P(regex="[0-9]+"), smol_tok)
    with pytest.raises(ValueError, match="int32 CPU"):
        c.fill_bitmask(torch.zeros(1, 1538, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="at least"):
        c.fill_bitmask(allocate_bitmask(1, 1000), 0)
    m = allocate_bitmask(3, PADDED)
    c.fill_bitmask(m, 1)
    assert (m[0] == -1).all() and (m[2] == -1).all() and not (m[1] == -1).all()
    # A wider row than the model's vocabulary: the extra words are cleared.
    wide = allocate_bitmask(2, PADDED + 100)
    c.fill_bitmask(wide, 0)
    assert torch.equal(wide[0, : m.shape[1]], m[1]) and (wide[0, m.shape[1]:] == 0).all()


def test_a_tokenizer_larger_than_the_logits(byte_tok: Any) -> None:
    # 256 byte tokens, but a model with only 200 logit rows: ids 200.. must never be allowed.
    c = constraint(P(regex="(?s:.+)"), byte_tok, vocab=200, eos=[2])
    got = allowed(c, 200)
    m = allocate_bitmask(1, 200)
    c.fill_bitmask(m, 0)
    assert got and max(got) < 200
    assert int(m[0, -1]) >> 8 == 0  # 200 = 6 * 32 + 8: the last word keeps its low 8 bits only


def test_factory_protocol_and_errors(smol_tok: Any) -> None:
    f = make_constraint_factory(P(regex="[a-c]{2}"), smol_tok, PADDED)
    assert isinstance(f, ConstraintFactory)
    f.future.result(10)
    assert f.done()
    one, two = f(), f()
    assert one is not two and isinstance(one, TokenConstraint)
    assert one.accept_token(smol_tok("a").input_ids[0])
    assert smol_tok.eos_token_id not in allowed(two)  # independent states
    bad = make_constraint_factory(P(regex="a("), smol_tok, PADDED)
    with pytest.raises(ValueError, match="regex"):
        bad()


def test_tokenizer_requirements(smol_tok: Any, byte_tok: Any) -> None:
    assert guidance_tokenizer(smol_tok, PADDED) is guidance_tokenizer(smol_tok, PADDED)
    g = guidance_tokenizer(smol_tok, PADDED, [2, 0])
    assert g.eos_token_ids == (0, 2) and g.vocab_size == PADDED
    with pytest.raises(ValueError, match="has none"):
        make_constraint_factory(P(regex="a"), None, 10)
    with pytest.raises(ValueError, match="end-of-sequence token id"):
        guidance_tokenizer(byte_tok)  # the byte tokenizer names no EOS
    with pytest.raises(ValueError, match="outside the vocabulary"):
        guidance_tokenizer(byte_tok, 256, [300])
    with pytest.raises(ValueError, match="positive"):
        guidance_tokenizer(byte_tok, 0, [1])

    class Slow:
        eos_token_id = 1

        def __len__(self) -> int:
            return 10

    with pytest.raises(ValueError, match="fast"):
        guidance_tokenizer(Slow())


def test_batch_fill_gives_the_per_row_masks(smol_tok: Any, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """``fill_bitmask_batch`` (llguidance's parallel fill, the GIL released) writes the same
    rows as ``fill_bitmask`` one row at a time: constraints in different states, a broken one
    (EOS only) and rows in any order, with other rows left alone."""
    from sagellm.engine.constraint import fill_bitmasks

    params = P(json_schema=SCHEMA, strict=True)
    cs = [constraint(params, smol_tok) for _ in range(4)]
    for t in smol_tok('{"name": "ab').input_ids:
        assert cs[1].accept_token(t)
    assert all(cs[2].accept_token(t) for t in smol_tok('{"name": "x", "age": 4').input_ids)
    assert not cs[3].accept_token(smol_tok("x").input_ids[0])  # broken: EOS only
    want = allocate_bitmask(6, PADDED)
    for row, c in zip([5, 0, 3, 2], cs, strict=True):
        c.fill_bitmask(want, row)
    got = allocate_bitmask(6, PADDED)
    import sagellm.structured.constraint as mod

    calls: list[int] = []
    real = mod._executor()

    class Spy:
        def unsafe_compute_mask_ptr(self, matchers: Any, *args: Any) -> None:
            calls.append(len(matchers))
            real.unsafe_compute_mask_ptr(matchers, *args)

    monkeypatch.setattr(mod, "_executor", lambda: Spy())
    GrammarConstraint.fill_bitmask_batch(cs, got, [5, 0, 3, 2])
    assert calls == [3]  # the three live grammars in one parallel call
    assert torch.equal(got, want)
    assert (got[1] == -1).all() and (got[4] == -1).all()  # untouched
    # Through the engine's entry point, mixed with a constraint that has no batch fill.
    class Nothing:
        def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
            bitmask[row] = 0

    mixed = allocate_bitmask(5, PADDED)
    fill_bitmasks([cs[0], Nothing(), cs[1], cs[2], cs[3]], mixed)  # type: ignore[list-item]
    for i, row in [(0, 5), (2, 0), (3, 3), (4, 2)]:
        assert torch.equal(mixed[i], want[row])
    assert (mixed[1] == 0).all()


def test_batch_fill_refuses_bad_rows(smol_tok: Any) -> None:
    cs = [constraint(P(regex="a+"), smol_tok) for _ in range(2)]
    mask = allocate_bitmask(2, PADDED)
    with pytest.raises(ValueError, match="distinct"):
        GrammarConstraint.fill_bitmask_batch(cs, mask, [1, 1])
    with pytest.raises(ValueError, match="distinct and in 0..1"):
        GrammarConstraint.fill_bitmask_batch(cs, mask, [0, 2])
    with pytest.raises(ValueError, match="distinct and in 0..1"):
        GrammarConstraint.fill_bitmask_batch(cs, mask, [-1, 0])
    with pytest.raises(ValueError, match="2 constraints for 1 bitmask rows"):
        GrammarConstraint.fill_bitmask_batch(cs, mask, [0])
    with pytest.raises(ValueError, match="int32 CPU"):
        GrammarConstraint.fill_bitmask_batch(cs, mask.to(torch.int64), [0, 1])
    GrammarConstraint.fill_bitmask_batch([], mask, [])  # nothing to do


def test_grammar_threads_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import sagellm.structured.constraint as mod

    monkeypatch.delenv(mod.THREADS_ENV, raising=False)
    assert mod.grammar_threads() is None
    monkeypatch.setenv(mod.THREADS_ENV, " 3 ")
    assert mod.grammar_threads() == 3
    made: list[int | None] = []
    monkeypatch.setattr(mod, "_EXECUTOR", None)
    monkeypatch.setattr(mod.llguidance, "LLExecutor", lambda n: made.append(n) or object())
    first = mod._executor()
    assert mod._executor() is first and made == [3]  # one executor per process
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv(mod.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=mod.THREADS_ENV):
            mod.grammar_threads()
