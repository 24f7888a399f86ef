"""Errors the offline API raises about one request of a batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sagellm.outputs import RequestOutput


class RequestError(RuntimeError):
    """The engine failed one request of an ``LLM.generate`` call.

    Raised rather than returned as an output with ``finish_reason == "error"``, which an
    offline caller iterating over texts would silently lose. The call's other unfinished
    requests are aborted first; the engine itself is unharmed and serves the next call.
    """

    def __init__(self, request_id: str, error: str, index: int | None = None,
                 output: RequestOutput | None = None) -> None:
        where = f" (prompt {index} of the call)" if index is not None else ""
        super().__init__(f"request {request_id}{where} failed: {error}; the call's other "
                         "requests were aborted")
        self.request_id = request_id
        #: ``"ExcType: message"``, as in ``RequestOutput.error``.
        self.error = error
        #: Position of the failed prompt in the prompts passed to ``generate``.
        self.index = index
        #: The failed request's last output (tokens and text it had produced).
        self.output = output
