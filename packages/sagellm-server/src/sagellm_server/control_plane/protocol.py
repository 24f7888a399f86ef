"""What an engine tells the control plane: its registration (once) and its load (every heartbeat).

Both sides import these models, so the wire has one definition. Unknown fields are ignored, so an
engine newer than its control plane (or older) still registers.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The registration routes live below this path; they take the registration secret (as
#: ``Authorization: Bearer <secret>``) instead of the API key.
REGISTRATION_PREFIX = "/internal/engines"
#: Where both sides read the registration secret from when no flag gives it.
SECRET_ENV = "SAGELLM_CONTROL_PLANE_SECRET"


class EngineLoad(BaseModel):
    """An engine's load as its server sees it (from the engine loop's latest stats)."""

    model_config = ConfigDict(extra="ignore")

    num_running: int = Field(0, ge=0)
    num_waiting: int = Field(0, ge=0)
    #: Requests the server holds (running, waiting, or queued before the engine): its outstanding work.
    num_in_flight: int = Field(0, ge=0)
    kv_usage: float = Field(0.0, ge=0.0, le=1.0)
    #: False while the engine is dead or restarting: the server answers 503 then.
    alive: bool = True
    #: True once the server has begun a graceful shutdown.
    draining: bool = False

    @property
    def num_outstanding(self) -> int:
        return max(self.num_in_flight, self.num_running + self.num_waiting)


class EngineRegistration(BaseModel):
    """Who an engine is and what it serves."""

    model_config = ConfigDict(extra="ignore")

    #: Where the control plane reaches the engine's OpenAI routes (``--advertise-url``).
    url: str = Field(..., min_length=8, max_length=2048)
    models: list[str] = Field(..., min_length=1, max_length=64)
    backend: str = Field("", max_length=200)
    device: str = Field("", max_length=200)
    max_model_len: int = Field(0, ge=0)
    num_kv_blocks: int = Field(0, ge=0)
    block_size: int = Field(0, ge=0)
    #: The most requests the engine runs at once (its batch): the unit of its load.
    max_num_seqs: int = Field(1, ge=1)
    #: Seconds between this engine's heartbeats; the control plane counts misses in these.
    heartbeat_interval: float = Field(..., gt=0.0, le=3600.0)
    version: str = Field("", max_length=100)
    load: EngineLoad = Field(default_factory=EngineLoad)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith(("http://", "https://")) or "?" in value or "#" in value:
            raise ValueError("must be an http:// or https:// URL without query or fragment")
        return value

    @field_validator("models")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        if any(not name or len(name) > 512 for name in value):
            raise ValueError("model names must be 1..512 characters")
        return value

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size
