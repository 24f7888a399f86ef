"""Engine configuration, validated once at start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LoadFormat = Literal["auto", "hf", "safetensors", "gguf", "dummy"]


class EngineConfig(BaseModel):
    """Everything ``LLMEngine`` needs; ``LLM(**kwargs)`` and the CLIs fill it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="HF directory, GGUF file, or None for the embedded default")
    tokenizer: str | None = None
    backend: str = "auto"
    dtype: str = "auto"
    load_format: LoadFormat = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = Field(16, ge=1)
    #: Fraction of device memory the engine may use in total (weights, activations, KV).
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    #: Fixed KV pool size in blocks (overrides profiling); mainly for tests and small devices.
    num_kv_blocks: int | None = Field(None, ge=1)
    #: KV pool size in bytes for the CPU backend (which does not profile).
    cpu_kv_cache_bytes: int = Field(1 << 30, ge=1 << 20)
    max_num_seqs: int = Field(256, ge=1)
    #: Token budget of one step, prefill and decode tokens together.
    max_num_batched_tokens: int = Field(8192, ge=16)
    #: Prefill token budget of one step; longer prompts are prefilled in chunks of at most this.
    #: ``None``: the backend's default (``Capabilities.prefill_chunk_tokens``), else
    #: ``max_num_batched_tokens``; the engine fills in the value it uses.
    max_prefill_tokens: int | None = Field(None, ge=16)
    #: Reuse the KV blocks of identical prompt prefixes across requests.
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = Field(1, ge=1)
    #: Prefill on a second worker (device ``device_index + 1``) and hand the prompts' KV
    #: blocks to this one, which decodes (``sagellm.distributed.disagg``).
    disaggregate_prefill: bool = False
    device_index: int = 0

    @model_validator(mode="after")
    def _budgets(self) -> EngineConfig:
        # ``None`` stays None here: the default depends on the backend, known only to the engine.
        if self.max_prefill_tokens is not None and self.max_prefill_tokens > self.max_num_batched_tokens:
            raise ValueError("max_prefill_tokens must not exceed max_num_batched_tokens")
        return self

    def with_prefill_budget(self, platform_chunk: int | None) -> EngineConfig:
        """A copy with ``max_prefill_tokens`` set: as given, else ``platform_chunk`` (the
        backend's default chunk), else ``max_num_batched_tokens``; never above the latter."""
        if self.max_prefill_tokens is not None:
            return self
        budget = min(platform_chunk or self.max_num_batched_tokens, self.max_num_batched_tokens)
        return self.model_copy(update={"max_prefill_tokens": budget})
