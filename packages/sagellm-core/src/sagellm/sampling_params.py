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
#: OpenAI's range for ``presence_penalty`` and ``frequency_penalty`` (subtracted from logits).
MAX_ABS_PENALTY = 2.0
#: ``repetition_penalty`` divides positive logits and multiplies negative ones; past 2 it all but
#: bans every token already seen, which is a typo rather than a setting.
MAX_REPETITION_PENALTY = 2.0
#: ``logit_bias`` is added per token each step; OpenAI's range is -100..100 and a dict beyond
#: this many entries is a constraint, not a bias (structured output does that).
MAX_LOGIT_BIAS = 1024
MAX_LOGIT_BIAS_VALUE = 100.0
#: Choices per request: each is a sequence of its own in the batch.
MAX_N = 128
#: Top alternatives reported per token (OpenAI's ``top_logprobs`` limit), for outputs and prompts.
MAX_LOGPROBS = 20


class SamplingParams(BaseModel):
    """How to pick tokens and when to stop.

    ``temperature == 0`` means greedy; a tiny positive temperature tends to greedy without
    overflowing (the sampler subtracts each row's maximum logit before dividing). ``top_k <= 0``
    disables top-k, and a ``top_k`` above the vocabulary keeps the whole vocabulary;
    ``top_p == 1`` disables nucleus sampling; ``min_p`` drops tokens less likely than ``min_p``
    times the most likely one (after temperature; 0 disables). ``seed`` makes a sampled request
    reproducible whatever it is batched with; with ``n > 1`` choice ``i`` draws from seed
    ``seed + i`` (wrapped into the seed range), so each choice is reproducible and they differ.

    Penalties follow OpenAI and Hugging Face: ``presence_penalty`` is subtracted from the logit of
    every token already generated, ``frequency_penalty`` times its count in the output;
    ``repetition_penalty`` divides the positive logits (multiplies the negative ones) of every
    token in the prompt or the output. ``logit_bias`` maps token ids to a value added to their
    logits (ids past the vocabulary are refused by the engine). ``n`` choices share the prompt's
    prefill. ``logprobs`` asks for the log probability of each sampled token plus that many top
    alternatives (0: the sampled token only), ``prompt_logprobs`` the same for every prompt token
    after the first; both are of the model's own distribution (see ``sagellm.layers.logprobs``).
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
    presence_penalty: float = Field(0.0, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY,
                                    allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY,
                                     allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, le=MAX_REPETITION_PENALTY, allow_inf_nan=False)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
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

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias_size(cls, v: object) -> object:
        # Before parsing, so a million-entry dict is refused without validating its entries.
        if v is None:
            return {}
        if isinstance(v, dict) and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(v)} entries; at most {MAX_LOGIT_BIAS} are allowed")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[int, float]) -> dict[int, float]:
        for tok, bias in v.items():
            if not 0 <= tok <= MAX_TOKEN_ID:
                raise ValueError(f"logit_bias token id {tok} is outside 0..{MAX_TOKEN_ID}")
            if not -MAX_LOGIT_BIAS_VALUE <= bias <= MAX_LOGIT_BIAS_VALUE:  # NaN fails this too
                raise ValueError(f"logit_bias value {bias} for token {tok} is outside "
                                 f"-{MAX_LOGIT_BIAS_VALUE:g}..{MAX_LOGIT_BIAS_VALUE:g}")
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

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def argmax_is_token(self) -> bool:
        """Whether the raw logits' argmax is this request's token: greedy, with nothing that
        changes the logits first (logprobs may still read them)."""
        return (self.temperature == 0.0 and not self.min_tokens and not self.has_penalties
                and not self.logit_bias)

    @property
    def argmax_suffices(self) -> bool:
        """:attr:`argmax_is_token`, and nothing reads the logits either (a runner may then skip
        them, as CUDA graphs do)."""
        return self.argmax_is_token and self.logprobs is None


def _raise(msg: str) -> int:
    raise ValueError(msg)
