"""The grammar engine's view of a tokenizer is built once per tokenizer content (copies share
it), and the engine's entry point never builds it on the caller's thread."""

from __future__ import annotations

import copy
import json
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from sagellm.structured import factory as factory_mod
from sagellm.structured import tokenizer as mod
from sagellm.structured.params import StructuredOutputParams as P
from sagellm.testing.tiny_model import make_tiny_llama

EOS = [2]
DIGITS = P(regex=r"[0-9]{2}")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("cache-tok"), tokenizer=True)


@pytest.fixture
def tok(tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Cold caches, and a count of the views actually built."""
    monkeypatch.setattr(mod, "_digests", weakref.WeakKeyDictionary())
    monkeypatch.setattr(mod, "_cache", weakref.WeakKeyDictionary())
    monkeypatch.setattr(mod, "_shared", weakref.WeakValueDictionary())
    made: list[int] = []
    real = mod._build

    def counted(*a: Any) -> Any:
        made.append(1)
        return real(*a)

    monkeypatch.setattr(mod, "_build", counted)
    return made


def test_copies_of_a_tokenizer_share_one_build(tok: Any, builds: list[int]) -> None:
    first = mod.guidance_tokenizer(tok, 256, EOS)
    twin = copy.deepcopy(tok)
    assert mod.guidance_tokenizer(twin, 256, EOS) is first
    assert mod.guidance_tokenizer(tok, 256, EOS) is first
    assert len(builds) == 1
    # Another vocabulary size or EOS set is another view.
    assert mod.guidance_tokenizer(twin, 320, EOS) is not first
    assert len(builds) == 2


def test_equal_tokenizers_on_two_threads_build_once(tok: Any, builds: list[int]) -> None:
    copies = [tok, copy.deepcopy(tok), copy.deepcopy(tok)]
    got: list[Any] = []
    threads = [threading.Thread(target=lambda t=t: got.append(mod.guidance_tokenizer(t, 256, EOS)))
               for t in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and all(g is got[0] for g in got)
    assert len(builds) == 1


def test_another_content_is_another_build(tok: Any, tok_dir: Path, builds: list[int],
                                          tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    mod.guidance_tokenizer(tok, 256, EOS)
    other = make_tiny_llama(tmp_path / "other", tokenizer=True)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens trade ids
    (other / "tokenizer.json").write_text(json.dumps(spec))
    changed = AutoTokenizer.from_pretrained(str(other))
    assert mod._digest(changed) != mod._digest(tok)
    assert mod.guidance_tokenizer(changed, 256, EOS) is not mod.guidance_tokenizer(tok, 256, EOS)
    assert len(builds) == 2


def test_cached_lookup_builds_nothing_and_refuses_what_cannot_serve(tok: Any,
                                                                      builds: list[int]) -> None:
    assert mod.cached_guidance_tokenizer(tok, 256, EOS) is None
    assert builds == [] and tok not in mod._digests
    built = mod.guidance_tokenizer(tok, 256, EOS)
    assert mod.cached_guidance_tokenizer(tok, 256, EOS) is built
    with pytest.raises(ValueError, match="has none"):
        mod.cached_guidance_tokenizer(None, 256, EOS)
    with pytest.raises(ValueError, match="fast"):
        mod.cached_guidance_tokenizer(object(), 256, EOS)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        mod.cached_guidance_tokenizer(tok, 256, [999])


def test_the_first_grammar_builds_the_view_off_the_callers_thread(
        tok: Any, builds: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    where: list[str] = []
    slow = mod._build

    def blocked(*a: Any) -> Any:
        where.append(threading.current_thread().name)
        assert release.wait(30)
        return slow(*a)

    monkeypatch.setattr(mod, "_build", blocked)
    made = factory_mod.make_constraint_factory(DIGITS, tok, 256, EOS)  # returns while blocked
    assert not made.done()
    release.set()
    constraint = made(timeout=30)
    assert where and where[0] != threading.current_thread().name
    assert constraint.accept_token(tok.convert_tokens_to_ids("4"))
    # Once built, a new grammar compiles straight away (no second build).
    again = factory_mod.make_constraint_factory(P(regex="[a-z]"), tok, 256, EOS)
    again(timeout=30)
    assert len(where) == 1


def test_a_view_that_cannot_be_built_fails_the_grammar_not_the_caller(
        tok: Any, builds: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(*a: Any) -> Any:
        raise ValueError("the grammar engine cannot read this tokenizer: test")

    monkeypatch.setattr(mod, "_build", unreadable)
    made = factory_mod.make_constraint_factory(DIGITS, tok, 256, EOS)
    with pytest.raises(ValueError, match="cannot read this tokenizer"):
        made(timeout=30)
    # Refusals that need no build still come at once.
    with pytest.raises(ValueError, match="has none"):
        factory_mod.make_constraint_factory(DIGITS, None, 256, EOS)
