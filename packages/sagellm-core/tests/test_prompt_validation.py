"""The prompt check the engine and the server share."""

from __future__ import annotations

import pytest

from sagellm.prompt_validation import PromptError, validate_prompt


@pytest.mark.parametrize(("ids", "code", "message"), [
    ([], "invalid_value", "the prompt is empty"),
    ([1] * 8, "context_length_exceeded",
     "this model's maximum context length is 8 tokens; the prompt has 8 tokens, leaving no room "
     "for a completion"),
    ([1, 100], "invalid_value", r"token id 100 is outside the vocabulary \(0..99\)"),
    ([-1], "invalid_value", r"token id -1 is outside the vocabulary"),
])
def test_what_cannot_be_served_is_a_value_error_with_a_code(ids: list[int], code: str,
                                                            message: str) -> None:
    with pytest.raises(PromptError, match=message) as exc:
        validate_prompt(ids, vocab_size=100, max_model_len=8)
    assert isinstance(exc.value, ValueError) and exc.value.code == code


def test_a_servable_prompt_passes() -> None:
    validate_prompt([0, 99] + [5] * 5, vocab_size=100, max_model_len=8)


def test_length_is_checked_before_the_ids() -> None:
    # O(1) first: an over-long prompt is refused without reading its (possibly bad) ids.
    with pytest.raises(PromptError) as exc:
        validate_prompt([10_000] * 9, vocab_size=100, max_model_len=8)
    assert exc.value.code == "context_length_exceeded"
