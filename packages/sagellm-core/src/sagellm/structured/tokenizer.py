"""The grammar engine's view of a model's tokenizer, built once per tokenizer and cached.

``LLMEngine.tokenizer`` is a Hugging Face fast tokenizer (``AutoTokenizer`` over an HF directory;
a GGUF file is first converted into one, so the embedded SmolLM2 arrives the same way).
llguidance reads its serialised form and builds a token trie, which takes a few hundred
milliseconds for a 50k vocabulary: hence the cache, keyed on the tokenizer object (weakly, so a
dropped engine frees it) and on the model's vocabulary size and end-of-sequence ids.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import llguidance


@dataclass(frozen=True, eq=False)
class GuidanceTokenizer:
    """An llguidance tokenizer sized to the model's logits.

    ``vocab_size`` is the width of the model's logits, which may exceed the tokenizer's own
    vocabulary (embedding rows padded to a multiple of 64 or 128): those ids have no text and are
    never allowed. ``eos_token_ids`` are the ids that end a sequence; the constraint allows them
    exactly when its grammar may end.
    """

    ll: llguidance.LLTokenizer
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    @property
    def num_words(self) -> int:
        """Words per bitmask row as llguidance writes them (its vocabulary, >= ``vocab_size``)."""
        return (self.ll.vocab_size + 31) // 32


_cache: weakref.WeakKeyDictionary[object, dict[tuple[int, tuple[int, ...]], GuidanceTokenizer]] = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def guidance_tokenizer(tokenizer: object, vocab_size: int | None = None,
                       eos_token_ids: Iterable[int] | None = None) -> GuidanceTokenizer:
    """The cached :class:`GuidanceTokenizer` for an HF fast ``tokenizer``.

    ``vocab_size`` defaults to the tokenizer's length; ``eos_token_ids`` (the engine's
    ``LLMEngine.eos_token_ids``: the model config's ids and the tokenizer's) default to the
    tokenizer's ``eos_token_id``. Raises ``ValueError`` for a model without a tokenizer, a slow
    (Python) tokenizer, or one with no end-of-sequence token.
    """
    if tokenizer is None:
        raise ValueError("structured output needs the model's tokenizer, and this model has none")
    n_tok = len(tokenizer)  # type: ignore[arg-type]
    vocab = n_tok if vocab_size is None else int(vocab_size)
    if vocab <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab}")
    eos = _eos_ids(tokenizer, eos_token_ids, vocab)
    key = (vocab, eos)
    with _lock:
        hit = _cache.get(tokenizer, {}).get(key)
    if hit is not None:
        return hit
    built = GuidanceTokenizer(_build(tokenizer, max(vocab, n_tok), eos), vocab, eos)
    with _lock:
        # Two threads may build at once; the first to store wins, so everyone shares one.
        return _cache.setdefault(tokenizer, {}).setdefault(key, built)


def _eos_ids(tokenizer: object, given: Iterable[int] | None, vocab: int) -> tuple[int, ...]:
    if given is not None:
        ids = sorted({int(t) for t in given})
    else:
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        ids = [] if tok_eos is None else [int(tok_eos)]
    if not ids:
        raise ValueError("structured output needs an end-of-sequence token id, and neither the "
                         "model nor its tokenizer names one")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"end-of-sequence id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    return tuple(ids)


def _build(tokenizer: object, n_vocab: int, eos: tuple[int, ...]) -> llguidance.LLTokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"structured output needs a fast (Rust) tokenizer; "
                         f"{type(tokenizer).__name__} is not one")
    import llguidance.hf  # imports transformers: only where an HF tokenizer is at hand

    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab,  # type: ignore[arg-type]
                                            eos_token=list(eos))
    except ValueError as exc:  # pragma: no cover - llguidance rejects a tokenizer it cannot read
        raise ValueError(f"the grammar engine cannot read this tokenizer: {exc}") from None
