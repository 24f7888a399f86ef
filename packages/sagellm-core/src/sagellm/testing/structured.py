"""Test helpers for token constraints: a greedy decode loop through the real bitmask path, and a
checker for the JSON-schema subset the tests use (independent of the grammar engine)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sagellm.structured.bitmask import allocate_bitmask, apply_token_bitmask
from sagellm.structured.protocol import TokenConstraint


class OnlyToken:
    """A constraint double (:class:`TokenConstraint`, no batch fill): only ``token`` is
    allowed; complete after ``length`` accepted tokens (never, with ``None``). ``accepted``
    counts the tokens offered to it."""

    def __init__(self, token: int, length: int | None = None) -> None:
        self.token, self.length, self.accepted = token, length, 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        bitmask[row, self.token // 32] = 1 << (self.token % 32)

    def accept_token(self, token_id: int) -> bool:
        self.accepted += 1
        return token_id == self.token

    def is_terminated(self) -> bool:
        return self.length is not None and self.accepted >= self.length


class Scripted:
    """A constraint double whose allowed token changes every step: only ``script[k]`` may
    follow ``k`` accepted tokens (complete after the last). It ORs its bit into the row, so it
    relies on the row arriving cleared; a mask filled before the previous token was accepted
    allows the previous step's token, which it then refuses."""

    def __init__(self, script: Sequence[int]) -> None:
        self.script, self.accepted = list(script), 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        tok = self.script[min(self.accepted, len(self.script) - 1)]
        w, b = divmod(tok, 32)
        bitmask[row, w] |= (1 << b) - (1 << 32) if b == 31 else 1 << b

    def accept_token(self, token_id: int) -> bool:
        ok = self.accepted < len(self.script) and token_id == self.script[self.accepted]
        self.accepted += 1
        return ok

    def is_terminated(self) -> bool:
        return self.accepted >= len(self.script)


def run_scripted_beside_greedy(engine: Any, scripts: Sequence[Sequence[int]],
                               max_greedy_tokens: int = 16,
                               constraint_class: type[Scripted] | None = None) -> list[Any]:
    """Run ``engine`` (an ``LLMEngine``) with one plain greedy request and a :class:`Scripted`
    constrained request per script (``constraint_class``: a subclass of it instead), the latter
    added one per step (so steps hold a prompt beside running decodes, whole-batch and partly
    constrained); returns each scripted request's finished output, in ``scripts`` order. A
    stale or missing mask shows up as an output with an error or other tokens than its script."""
    from sagellm.sampling_params import SamplingParams

    greedy = SamplingParams(max_tokens=max(len(s) for s in scripts) + 4, temperature=0.0,
                            ignore_eos=True)
    engine.add_request([9, 8, 7], SamplingParams(max_tokens=max_greedy_tokens, temperature=0.0,
                                                 ignore_eos=True))
    cls = constraint_class or Scripted
    pending = list(enumerate(scripts))
    ids: list[str] = []
    done: dict[str, Any] = {}
    while pending or engine.has_unfinished_requests():
        if pending:
            k, script = pending.pop(0)
            ids.append(engine.add_request([3 + k, 4, 5], greedy,
                                          constraint=lambda s=script: cls(s)))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[rid] for rid in ids]


#: ``next_logits(tokens so far) -> [vocab]`` logits for the next token.
LogitsFn = Callable[[Sequence[int]], torch.Tensor]


def random_logits(vocab_size: int, seed: int = 0, bias: torch.Tensor | None = None) -> LogitsFn:
    """Fresh standard-normal logits every step (plus ``bias``), reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    if bias is None:
        return lambda _tokens: torch.randn(vocab_size, generator=gen)
    return lambda _tokens: torch.randn(vocab_size, generator=gen) + bias


def whitespace_penalty(tokenizer: Any, vocab_size: int, penalty: float = 4.0) -> torch.Tensor:
    """A bias lowering tokens that are only whitespace: random logits otherwise spend most of
    a JSON decode on the whitespace the grammar allows between tokens."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    bias = torch.zeros(vocab_size)
    bias[[i for i, t in enumerate(texts) if t and not t.strip()]] = -penalty
    return bias


def drive_constraint(constraint: TokenConstraint, vocab_size: int, next_logits: LogitsFn,
                     max_steps: int = 512) -> list[int]:
    """Decode greedily under ``constraint`` until it terminates; returns every token picked.

    Each step does what a model runner does: fill the request's bitmask row, mask the logits
    with ``apply_token_bitmask``, take the argmax, and hand it to ``accept_token`` (which must
    accept it, since it was allowed). Raises ``AssertionError`` if the constraint does not
    terminate within ``max_steps``.
    """
    bitmask = allocate_bitmask(1, vocab_size)
    tokens: list[int] = []
    for _ in range(max_steps):
        logits = next_logits(tokens).reshape(1, -1).clone()
        constraint.fill_bitmask(bitmask, 0)
        apply_token_bitmask(logits, bitmask)
        token = int(logits.argmax())
        assert torch.isfinite(logits[0, token]), "the constraint allowed no token"
        assert constraint.accept_token(token), f"an allowed token {token} was refused"
        tokens.append(token)
        if constraint.is_terminated():
            return tokens
    raise AssertionError(f"the constraint did not terminate in {max_steps} steps")


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema``, for the keywords ``type``, ``enum``, ``const``,
    ``properties``, ``required``, ``additionalProperties: false``, ``items``, ``maxItems``,
    ``minItems``, ``maxLength``, ``minLength``, ``minimum``, ``maximum`` and ``anyOf``."""
    errs: list[str] = []
    if "anyOf" in schema:
        if all(schema_errors(value, s, path) for s in schema["anyOf"]):
            errs.append(f"{path}: matches no anyOf branch")
    t = schema.get("type")
    if t is not None and not _TYPES[t](value):
        return [*errs, f"{path}: {value!r} is not of type {t}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: {value!r} != {schema['const']!r}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errs += [f"{path}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            errs += [f"{path}: unexpected {k!r}" for k in value if k not in props]
        for k, sub in props.items():
            if k in value:
                errs += schema_errors(value[k], sub, f"{path}.{k}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)) or len(value) < schema.get("minItems", 0):
            errs.append(f"{path}: {len(value)} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errs += schema_errors(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            errs.append(f"{path}: length {len(value)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            errs.append(f"{path}: {value} out of range")
    return errs
