"""The grammar engine's view of a model's tokenizer, built once per tokenizer and cached.

``LLMEngine.tokenizer`` is a Hugging Face fast tokenizer (``AutoTokenizer`` over an HF directory;
a GGUF file is first converted into one, so the embedded SmolLM2 arrives the same way).
llguidance reads its serialised form and builds a token trie, which takes a few hundred
milliseconds (about 0.45 s for Qwen2.5's 151k vocabulary on one core): hence the cache, keyed on
the tokenizer's content (a digest of its serialised form, so the copies a server keeps for its
worker threads share one build) and on the model's vocabulary size and end-of-sequence ids.
Entries live while a tokenizer object that uses them does (weakly held: a dropped engine frees
them). :func:`cached_guidance_tokenizer` answers without building, for callers that must not
wait (the engine's step loop hands the build to a worker instead).
"""

from __future__ import annotations

import copy
import hashlib
import json
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


#: Per tokenizer object: its content digest, and the built views it has used (which keeps them
#: alive while it lives).
_digests: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()
_cache: weakref.WeakKeyDictionary[object, dict[tuple[int, tuple[int, ...]], GuidanceTokenizer]] = (
    weakref.WeakKeyDictionary())
#: Built views by (content digest, vocabulary size, EOS ids), shared by equal tokenizers.
_shared: weakref.WeakValueDictionary[tuple[str, int, tuple[int, ...]], GuidanceTokenizer] = (
    weakref.WeakValueDictionary())
#: One lock per view being built, so equal tokenizers on two threads build it once.
_building: dict[tuple[str, int, tuple[int, ...]], threading.Lock] = {}
_lock = threading.Lock()


def guidance_tokenizer(tokenizer: object, vocab_size: int | None = None,
                       eos_token_ids: Iterable[int] | None = None) -> GuidanceTokenizer:
    """The cached :class:`GuidanceTokenizer` for an HF fast ``tokenizer`` (built on first use:
    a blocking call of up to about half a second).

    ``vocab_size`` defaults to the tokenizer's length; ``eos_token_ids`` (the engine's
    ``LLMEngine.eos_token_ids``: the model config's ids and the tokenizer's) default to the
    tokenizer's ``eos_token_id``. Raises ``ValueError`` for a model without a tokenizer, a slow
    (Python) tokenizer, or one with no end-of-sequence token.
    """
    vocab, eos, n_tok = _settings(tokenizer, vocab_size, eos_token_ids)
    key = (vocab, eos)
    with _lock:
        hit = _cache.get(tokenizer, {}).get(key)
    if hit is not None:
        return hit
    shared_key = (_digest(tokenizer), vocab, eos)
    with _lock:
        building = _building.setdefault(shared_key, threading.Lock())
    with building:
        with _lock:
            built = _shared.get(shared_key)
        if built is None:
            built = GuidanceTokenizer(_build(tokenizer, max(vocab, n_tok), eos), vocab, eos)
        with _lock:
            built = _shared.setdefault(shared_key, built)
            _building.pop(shared_key, None)
            return _cache.setdefault(tokenizer, {}).setdefault(key, built)


def cached_guidance_tokenizer(tokenizer: object, vocab_size: int | None = None,
                              eos_token_ids: Iterable[int] | None = None
                              ) -> GuidanceTokenizer | None:
    """:func:`guidance_tokenizer` if this tokenizer object has already used it, else ``None``
    (nothing is built or digested here: microseconds). Raises the same ``ValueError`` for a
    tokenizer the grammar engine cannot use at all (none, slow, no EOS id)."""
    vocab, eos, _ = _settings(tokenizer, vocab_size, eos_token_ids)
    with _lock:
        return _cache.get(tokenizer, {}).get((vocab, eos))


def _settings(tokenizer: object, vocab_size: int | None, eos_token_ids: Iterable[int] | None
              ) -> tuple[int, tuple[int, ...], int]:
    """``(vocab, eos ids, tokenizer length)``, checked (the cheap refusals)."""
    if tokenizer is None:
        raise ValueError("structured output needs the model's tokenizer, and this model has none")
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(f"structured output needs a fast (Rust) tokenizer; "
                         f"{type(tokenizer).__name__} is not one")
    n_tok = len(tokenizer)  # type: ignore[arg-type]
    vocab = n_tok if vocab_size is None else int(vocab_size)
    if vocab <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab}")
    return vocab, _eos_ids(tokenizer, eos_token_ids, vocab), n_tok


def _digest(tokenizer: object) -> str:
    """SHA-256 of the tokenizer's serialised form (about 20 ms for a 151k vocabulary), once per
    tokenizer object. Equal digests mean the grammar engine reads the two the same way."""
    with _lock:
        hit = _digests.get(tokenizer)
    if hit is not None:
        return hit
    text = tokenizer.backend_tokenizer.to_str()  # type: ignore[attr-defined]
    digest = hashlib.sha256(text.encode()).hexdigest()
    with _lock:
        return _digests.setdefault(tokenizer, digest)


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
    backend = tokenizer.backend_tokenizer  # type: ignore[attr-defined]
    # As llguidance.hf.from_tokenizer does (a copy without padding or truncation, added tokens
    # included), with the byte-level fix below.
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    try:
        ll = llguidance.LLTokenizer(byte_level_consistent(backend.to_str()), n_vocab=n_vocab,
                                    eos_token=list(eos))
    except ValueError as exc:  # pragma: no cover - llguidance rejects a tokenizer it cannot read
        raise ValueError(f"the grammar engine cannot read this tokenizer: {exc}") from None
    _check_token_bytes(ll, tokenizer)
    return ll


def byte_level_consistent(tokenizer_json: str) -> str:
    """``tokenizer_json`` as the grammar engine must read it.

    A BPE tokenizer whose pre-tokenizer is byte-level stores every token in the GPT-2 byte
    alphabet (``Ġ`` for a space). Some conversions also set ``byte_fallback`` and a
    sentencepiece-style decoder on it (transformers 5.17's GGUF converter does, for SmolLM2):
    the tokenizer still encodes and decodes right, since byte-level input never falls back, but
    llguidance then takes the tokens for literal UTF-8 and reads ``Ġ`` as two bytes, so a
    grammar that needs a space allows token ``Ġ`` in its mask and refuses it when consumed.
    Such a tokenizer is handed over as the byte-level tokenizer it is; others are unchanged.
    """
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") \
            or not _has_byte_level(spec.get("pre_tokenizer")):
        return tokenizer_json
    model["byte_fallback"] = False
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                       "use_regex": True}
    return json.dumps(spec, ensure_ascii=False)


def _has_byte_level(part: object) -> bool:
    if not isinstance(part, dict):
        return False
    if part.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in part.get("pretokenizers") or [])


#: Ordinary tokens compared between the grammar engine's bytes and the tokenizer's own decoding.
_CHECKED_TOKENS = 512


def _check_token_bytes(ll: llguidance.LLTokenizer, tokenizer: object) -> None:
    """Refuse a tokenizer the grammar engine reads differently from the tokenizer itself: for
    a spread of ordinary tokens (decoding to clean text), llguidance's bytes must be the
    tokenizer's decoded text. A mismatch would make every grammar refuse the tokens it allows."""
    n = min(ll.vocab_size, len(tokenizer))  # type: ignore[arg-type]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    step = max(1, n // _CHECKED_TOKENS)
    checked = wrong = 0
    example = ""
    for tid in range(0, n, step):
        if tid in special:
            continue
        text = tokenizer.decode([tid])  # type: ignore[attr-defined]
        if not text or "\ufffd" in text or not text.isprintable():
            continue
        checked += 1
        got = ll.decode_bytes([tid])
        # A lone sentencepiece token decodes without its leading space in some tokenizers.
        if got.lstrip(b" ") != text.lstrip(" ").encode():
            wrong += 1
            example = example or f"token {tid}: tokenizer {text!r}, grammar engine {got!r}"
    if checked and wrong * 10 > checked:
        raise ValueError(f"the grammar engine reads this tokenizer's tokens differently from the "
                         f"tokenizer ({wrong} of {checked} checked, e.g. {example})")
