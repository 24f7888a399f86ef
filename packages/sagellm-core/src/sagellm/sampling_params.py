"""Per-request generation settings, validated on construction.

Every field is bounded here, so a value the engine cannot take fails as a pydantic
``ValidationError`` whose location names the field (the server answers it with HTTP 400)
instead of raising inside ``LLMEngine.step()``. Each limit lives in one module constant below.
Limits that depend on the model (context length, vocabulary) are checked by the engine.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from sagellm.structured.params import StructuredOutputParams

#: Above this the distribution is flat to float32 precision; a larger value only hides a typo.
MAX_TEMPERATURE = 100.0
#: Any ``top_k`` at or above the vocabulary means "the whole vocabulary"; this bound only keeps
#: the value inside the int64 tensor the sampler builds (``10**20`` would overflow it).
MAX_TOP_K = 2**31 - 1
#: The range ``torch.Generator.manual_seed`` accepts (negative seeds wrap modulo 2**64).
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1
#: Token counts; the real per-request limit is the model's context, checked by the engine.
MAX_TOKENS_LIMIT = 2**31 - 1
#: Stop strings are searched in the text after every token and the longest one is held back
#: from streaming, so their number and length are bounded.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
#: Stop token ids are checked per token and banned in the logits while ``min_tokens`` applies.
MAX_STOP_TOKEN_IDS = 1024
MAX_TOKEN_ID = 2**31 - 1


class SamplingParams(BaseModel):
    """How to pick tokens and when to stop.

    ``temperature == 0`` means greedy; a tiny positive temperature tends to greedy without
    overflowing (the sampler subtracts each row's maximum logit before dividing). ``top_k <= 0``
    disables top-k, and a ``top_k`` above the vocabulary keeps the whole vocabulary;
    ``top_p == 1`` disables nucleus sampling. ``seed`` makes a sampled request reproducible
    whatever it is batched with.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(-1, le=MAX_TOP_K)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] = Field(default_factory=list, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    #: Constrain the output to a JSON schema, regex, grammar or choice (``sagellm.structured``).
    structured_output: StructuredOutputParams | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: object) -> object:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        longest = max((len(s) for s in v), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ValueError(f"a stop string has {longest} characters; at most "
                             f"{MAX_STOP_STRING_CHARS} are allowed")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v: list[int]) -> list[int]:
        bad = [t for t in v if not 0 <= t <= MAX_TOKEN_ID]
        if bad:
            # A negative id would index the logits from the end and ban the wrong token.
            raise ValueError(f"stop token id {bad[0]} is outside 0..{MAX_TOKEN_ID}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v == 0 or v < -1:
            # 0 is accepted as "disabled" too, for clients that send it.
            return -1 if v == 0 else _raise(f"top_k must be -1 (disabled) or positive, got {v}")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_max(cls, v: int, info: ValidationInfo) -> int:
        # A field validator (not a model one) so the error's location names ``min_tokens``.
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and v > max_tokens:
            raise ValueError(f"min_tokens ({v}) exceeds max_tokens ({max_tokens})")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _raise(msg: str) -> int:
    raise ValueError(msg)
