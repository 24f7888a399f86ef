"""What the engine hands back per request and step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    #: All tokens generated so far.
    token_ids: list[int]
    #: All text generated so far (stop string removed unless asked to keep it).
    text: str
    #: Tokens and text added by the step that produced this output.
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    metrics: RequestMetrics | None = None
