"""The soak's request mix: what request number ``i`` of a run is, derived from (seed, i) alone.

Good requests stream through ``/v1/completions`` (random token-id prompts) or, a fraction of
them, ``/v1/chat/completions`` (random words); all ``ignore_eos`` with ``return_token_ids`` so the
client can check it got exactly ``max_tokens``. Half are greedy, half sampled with a fixed seed.
A fraction hang up after a random number of tokens (0 = right after the response headers), half
with a FIN, half with a RST.

Bad requests are hostile bodies that a server must answer with a 4xx and survive; they cycle
through :func:`bad_requests` so every kind is sent about equally often, each kind alternately
with and without ``stream``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

#: Token ids of random prompts (inside the vocabulary of every bench model, as in
#: shared/bench/README.md).
TOKEN_LO, TOKEN_HI = 100, 49000
_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
          "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


@dataclass(frozen=True)
class Mix:
    """The knobs of the mix (``--soak-*`` options)."""

    model: str | None
    max_model_len: int
    prompt_len: tuple[int, int] = (64, 1024)
    max_tokens: tuple[int, int] = (16, 256)
    disconnect: float = 0.3
    bad: float = 0.05
    chat: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class GoodRequest:
    path: str
    body: bytes
    max_tokens: int
    #: Hang up after this many tokens; None: read to the end.
    disconnect_after: int | None = None
    #: Hang up with a RST (SO_LINGER 0) rather than a FIN.
    reset: bool = False


@dataclass(frozen=True)
class BadRequest:
    kind: str
    path: str
    body: bytes


def plan(mix: Mix, i: int) -> GoodRequest | None:
    """Request ``i``: a good request, or None for the next bad one (the caller cycles them)."""
    rng = random.Random(f"{mix.seed}:{i}")
    if rng.random() < mix.bad:
        return None
    max_tokens = rng.randint(*mix.max_tokens)
    # Room for the completion, so a good request never trips the context limit.
    prompt_len = max(1, min(rng.randint(*mix.prompt_len), mix.max_model_len - max_tokens - 64))
    body: dict[str, Any] = {"max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                            "return_token_ids": True}
    if mix.model:
        body["model"] = mix.model
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:
        body.update(temperature=0.8, top_p=0.95, seed=i)
    if rng.random() < mix.chat:
        # Words are about one token each; the template adds a few dozen.
        words = " ".join(rng.choice(_WORDS) for _ in range(max(1, prompt_len - 40)))
        body["messages"] = [{"role": "system", "content": "You repeat words."},
                            {"role": "user", "content": words}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(prompt_len)]
        path = "/v1/completions"
    cut = rng.randrange(max_tokens) if rng.random() < mix.disconnect else None
    return GoodRequest(path, json.dumps(body).encode(), max_tokens, cut, reset=rng.random() < 0.5)


def bad_requests(model: str | None, max_model_len: int) -> list[BadRequest]:
    """Hostile requests, each of which deserves a 4xx (and no harm to anyone else)."""
    name = model or "unknown"
    ok: dict[str, Any] = {"model": name, "prompt": [TOKEN_LO, TOKEN_LO + 1], "max_tokens": 4}
    chat: dict[str, Any] = {"model": name, "max_tokens": 4}
    nested = 50_000
    cases: list[tuple[str, str, bytes | dict[str, Any]]] = [
        ("invalid_json", "/v1/completions", b'{"prompt": "hi",'),
        ("not_an_object", "/v1/completions", b"[1, 2]"),
        ("empty_body", "/v1/completions", b""),
        ("invalid_utf8", "/v1/completions", b'{"prompt": "\xff\xfe hi"}'),
        ("deeply_nested_json", "/v1/completions",
         b'{"prompt": ' + b"[" * nested + b"]" * nested + b"}"),
        # json.dumps escapes it as \ud800: valid JSON text, a str no UTF-8 encoder accepts.
        ("lone_surrogate_prompt", "/v1/completions", {**ok, "prompt": "abc \ud800 def"}),
        ("lone_surrogate_chat", "/v1/chat/completions",
         {**chat, "messages": [{"role": "user", "content": "hi \ud800"}]}),
        ("top_k_huge", "/v1/completions", {**ok, "top_k": 10**20, "temperature": 1.0}),
        ("seed_huge", "/v1/completions", {**ok, "seed": 2**70, "temperature": 1.0}),
        ("temperature_nan", "/v1/completions",
         b'{"prompt": [100, 101], "max_tokens": 4, "temperature": NaN}'),
        ("negative_max_tokens", "/v1/completions", {**ok, "max_tokens": -5}),
        ("max_tokens_huge", "/v1/completions", {**ok, "max_tokens": 2**63}),
        ("token_id_huge", "/v1/completions", {**ok, "prompt": [2**40]}),
        ("prompt_too_long", "/v1/completions", {**ok, "prompt": [TOKEN_LO] * (max_model_len + 16)}),
        ("unknown_model", "/v1/completions", {**ok, "model": "no-such-model-soak"}),
        ("huge_chat_template", "/v1/chat/completions",
         {**chat, "messages": [{"role": "user", "content": "hi"}],
          "chat_template": "{% set s = 'x' * 200000000 %}{{ s | length }}"}),
        ("chat_bad_role", "/v1/chat/completions",
         {**chat, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("chat_missing_role", "/v1/chat/completions", {**chat, "messages": [{"content": "hi"}]}),
        ("chat_content_not_text", "/v1/chat/completions",
         {**chat, "messages": [{"role": "user", "content": 5}]}),
    ]
    return [BadRequest(kind, path, body if isinstance(body, bytes) else json.dumps(body).encode())
            for kind, path, body in cases]


def bad_body(req: BadRequest, n: int) -> bytes:
    """The ``n``-th send of ``req``: JSON object bodies alternate ``stream`` false / true."""
    if n % 2 == 0 or not req.body.startswith(b'{"model"'):
        return req.body
    return req.body[:-1] + b', "stream": true}'
