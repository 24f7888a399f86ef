"""What the engine hands back per request and step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log probability under the model, and the most likely alternatives.

    ``rank`` is 1 + the number of tokens the model found strictly more likely (1: the argmax).
    ``top`` holds ``(token_id, logprob)`` pairs, most likely first, as many as the request's
    ``logprobs`` (or ``prompt_logprobs``) asked for; it may include ``token_id`` itself.
    """

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float | None


@dataclass
class RequestOutput:
    """One request's state after a step.

    ``prompt_token_ids`` and ``token_ids`` (and ``logprobs``) are materialised on first access
    only: a streaming consumer that reads ``new_token_ids`` pays nothing per step for a long
    context. A request with ``n > 1`` yields outputs with one ``request_id`` and ``index`` 0 ..
    n-1, one sequence of outputs per choice.
    """

    request_id: str
    prompt: str | None
    _all_token_ids: list[int] = field(repr=False)
    _num_prompt_tokens: int = field(repr=False)
    _num_tokens: int = field(repr=False)
    #: All text generated so far (stop string removed unless asked to keep it).
    text: str = ""
    #: Tokens and text added by the step that produced this output.
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    metrics: RequestMetrics | None = None
    #: ``"ExcType: message"`` when the engine failed this request (then ``finished`` is true
    #: and ``finish_reason == "error"``); ``None`` otherwise.
    error: str | None = None
    #: The choice this output belongs to (``0 .. SamplingParams.n - 1``).
    index: int = 0
    #: With ``SamplingParams.logprobs`` set: one entry per token of ``new_token_ids``.
    new_logprobs: list[TokenLogprob] | None = None
    #: With ``SamplingParams.prompt_logprobs`` set: one entry per prompt token, the first
    #: ``None`` (nothing precedes it). The same on every output of the request.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    _all_logprobs: list[TokenLogprob] | None = field(default=None, repr=False)

    @classmethod
    def from_lists(cls, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                   token_ids: list[int], text: str = "", **kwargs: object) -> RequestOutput:
        """Build an output from plain lists (test doubles, other engines)."""
        ids = list(prompt_token_ids) + list(token_ids)
        return cls(request_id, prompt, ids, len(prompt_token_ids), len(ids), text, **kwargs)  # type: ignore[arg-type]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._all_token_ids[: self._num_prompt_tokens]

    @property
    def token_ids(self) -> list[int]:
        """All tokens generated so far (as of this output's step)."""
        return self._all_token_ids[self._num_prompt_tokens: self._num_tokens]

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """One entry per token of ``token_ids`` (with ``SamplingParams.logprobs`` set)."""
        if self._all_logprobs is None:
            return None
        return self._all_logprobs[: self.num_output_tokens]

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return self._num_tokens - self._num_prompt_tokens
