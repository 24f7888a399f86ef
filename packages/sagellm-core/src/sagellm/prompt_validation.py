"""Whether a tokenized prompt can be served at all: the one check the engine and the server share.

It needs only the model's vocabulary size and context length, so the server (which holds no
engine) runs it before a request crosses to the engine process, and the engine runs it again for
callers that reach it directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from sagellm.sampling_params import SamplingParams

PromptErrorCode = Literal["invalid_value", "context_length_exceeded"]


class PromptError(ValueError):
    """A prompt no engine of this model can serve. The message names the fault in words that
    read well beside the offending parameter; ``code`` is the OpenAI error code for it."""

    def __init__(self, message: str, code: PromptErrorCode, param: str | None = None) -> None:
        super().__init__(message)
        self.code: PromptErrorCode = code
        #: The request field at fault when it is not the prompt (``"logit_bias"``), else ``None``.
        self.param = param


def validate_prompt(token_ids: Sequence[int], *, vocab_size: int, max_model_len: int) -> None:
    """Raise :class:`PromptError` if ``token_ids`` is empty, leaves no room for one generated
    token within ``max_model_len``, or holds an id outside ``0 .. vocab_size - 1``."""
    if not token_ids:
        raise PromptError("the prompt is empty", "invalid_value")
    # The length first: it is O(1), and a megabyte prompt's ids are not worth a loop then.
    if len(token_ids) >= max_model_len:
        raise PromptError(f"this model's maximum context length is {max_model_len} tokens; the "
                          f"prompt has {len(token_ids)} tokens, leaving no room for a completion",
                          "context_length_exceeded")
    for t in token_ids:
        if not 0 <= t < vocab_size:
            raise PromptError(f"token id {t} is outside the vocabulary (0..{vocab_size - 1})",
                              "invalid_value")


def validate_params(params: SamplingParams, *, vocab_size: int) -> None:
    """Raise :class:`PromptError` (``param`` naming the field) if ``params`` refers to a token
    outside this model's vocabulary: a ``logit_bias`` key past ``vocab_size - 1``."""
    bad = [t for t in params.logit_bias if t >= vocab_size]
    if bad:
        raise PromptError(f"logit_bias token id {max(bad)} is outside the vocabulary "
                          f"(0..{vocab_size - 1})", "invalid_value", param="logit_bias")
