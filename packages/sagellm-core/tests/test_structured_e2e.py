"""The wiring the runner will do, in plain Python: a tiny model's logits for a mixed batch, the
constrained rows masked through one bitmask, argmax, accept; constrained outputs parse and
validate, the unconstrained row is untouched by the mask."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

from sagellm.sampling_params import SamplingParams
from sagellm.structured.bitmask import allocate_bitmask, apply_token_bitmask
from sagellm.structured.factory import make_constraint_factory
from sagellm.testing.structured import schema_errors
from sagellm.testing.tiny_model import make_tiny_llama

#: Logit rows past the 256-token byte tokenizer, as padded embeddings have.
MODEL_VOCAB = 300
EOS = 2

EMAIL = r"[a-z]{1,8}@[a-z]{1,8}\.com"
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "c": {"enum": ["red", "blue"]},
                   "s": {"type": "string", "maxLength": 6}},
    "required": ["n", "c", "s"], "additionalProperties": False,
}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    # A 64-wide model gains nothing from threads, and on a busy 2-core box their contention
    # makes each forward ~50x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("tiny-json"), tokenizer=True,
                           vocab_size=MODEL_VOCAB)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def test_a_constrained_batch_yields_valid_json(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    # What the engine will do with SamplingParams.structured_output (see the factory's doc).
    wanted = SamplingParams(temperature=0, max_tokens=400, structured_output={"json_schema": SCHEMA})
    so = wanted.structured_output
    assert so is not None
    factory = make_constraint_factory(so, tok, MODEL_VOCAB, [EOS])
    other = make_constraint_factory(SamplingParams(structured_output={"regex": EMAIL})
                                    .structured_output, tok, MODEL_VOCAB, [EOS])  # type: ignore[arg-type]
    # Rows 0 and 2 constrained (the schema; a regex), row 1 free.
    constraints = {0: factory(), 2: other()}
    seqs = [tok("User: give me JSON\n").input_ids, tok("Hi").input_ids, tok("Go").input_ids]
    out: list[list[int]] = [[], [], []]
    free_ref: list[int] = []
    bitmask = allocate_bitmask(len(seqs), MODEL_VOCAB)
    done: set[int] = set()
    with torch.no_grad():
        for _ in range(wanted.max_tokens):
            live = [r for r in range(3) if r not in done]
            if not live or live == [1]:
                break
            logits = torch.cat([model(torch.tensor([seqs[r] + out[r]])).logits[:, -1]
                                for r in range(3)])
            free_ref.append(int(logits[1].argmax()))
            rows = [r for r in constraints if r not in done]
            for r in rows:
                constraints[r].fill_bitmask(bitmask, r)
            apply_token_bitmask(logits, bitmask, rows)
            picks = logits.argmax(dim=-1).tolist()
            for r in live:
                out[r].append(picks[r])
                if r in constraints:
                    assert constraints[r].accept_token(picks[r])
                    if constraints[r].is_terminated():
                        done.add(r)
    assert done == {0, 2}, "the constrained rows did not finish"
    assert out[1] == free_ref[: len(out[1])]  # the free row was not masked
    texts = [tok.decode([t for t in out[r] if t != EOS]) for r in (0, 2)]
    assert max(out[0] + out[2]) < 256  # never a padding row
    assert schema_errors(json.loads(texts[0]), SCHEMA) == [], texts[0]
    assert re.fullmatch(EMAIL, texts[1]), texts[1]


def test_the_model_vocab_padding_is_masked(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    c = make_constraint_factory(SamplingParams(structured_output={"regex": "(?s:.+)"})
                                .structured_output, tok, MODEL_VOCAB, [EOS])()  # type: ignore[arg-type]
    bitmask = allocate_bitmask(1, MODEL_VOCAB)
    c.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, MODEL_VOCAB)
    apply_token_bitmask(logits, bitmask)
    assert torch.isinf(logits[0, 256:]).all() and torch.isfinite(logits[0, 3:256]).any()
