"""Engine configuration, validated once at start-up."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sagellm.kv_cache.eviction import EvictionName

LoadFormat = Literal["auto", "hf", "safetensors", "gguf", "dummy"]
Quantization = Literal["auto", "none", "int8", "int4", "fp8"]


class EngineConfig(BaseModel):
    """Everything ``LLMEngine`` needs; ``LLM(**kwargs)`` and the CLIs fill it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(
        None, description="HF model directory, .gguf file or Hugging Face Hub repo id (owner/name, "
                          "fetched into the Hub's cache; HF_HUB_OFFLINE=1 reads the cache only); "
                          "default: the embedded SmolLM2-135M-Instruct")
    revision: str | None = Field(
        None, description="Hub revision of a repo-id model (branch, tag or commit); default: main")
    tokenizer: str | None = Field(None, description="tokenizer directory, if not the model's own")
    backend: str = Field(
        "auto", description="hardware backend by name (see `sagellm backends`); auto picks the single "
                            "available accelerator, else the CPU")
    dtype: str = Field(
        "auto", description="weights and activations: auto (the backend's default), float32, "
                            "bfloat16 or float16")
    load_format: LoadFormat = Field(
        "auto", description="how to read the weights (dummy: random weights, for load tests)")
    # "none" by default for now: "auto" (int4 for the embedded model on the CPU) is 3x faster
    # and within 0.3% perplexity, but changes some greedy answers (issue 16 report).
    quantization: Quantization = Field(
        "none", description="quantization on load: int8 (weights only, per output channel) or int4 "
                            "(groups of 32 on the CPU, 128 on CUDA), where the backend runs it; "
                            "fp8: fp8 weights (per output channel, or an FP8 checkpoint's own "
                            "scales) and activations (per token); auto runs a GGUF file, a "
                            "GPTQ/AWQ/compressed-tensors 4-bit directory or an FP8 checkpoint "
                            "from its stored weights where the backend has fast kernels for them "
                            "(the embedded model on the CPU: int4), anything else as loaded; "
                            "none: as loaded (a quantized checkpoint dequantized)")
    seed: int = Field(0, description="engine random seed (also the random weights of load_format dummy)")
    max_model_len: int | None = Field(
        None, ge=1, description="context length (prompt + completion); default: the model's own")
    block_size: int = Field(16, ge=1, description="tokens per KV cache block")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0,
        description="fraction of device memory the engine may use (weights, activations, KV cache)")
    # Mainly for tests and small devices.
    num_kv_blocks: int | None = Field(
        None, ge=1, description="fixed KV pool size in blocks, instead of sizing it from memory")
    cpu_kv_cache_bytes: int = Field(
        1 << 30, ge=1 << 20, description="KV pool size in bytes for the CPU backend (which does not "
                                          "profile memory)")
    max_num_seqs: int = Field(
        256, ge=1, description="most requests decoded together in one step (the running batch)")
    max_num_batched_tokens: int = Field(
        8192, ge=16, description="token budget of one engine step (prefill chunks plus decodes)")
    #: ``None``: the backend's default (``Capabilities.prefill_chunk_tokens``), else
    #: ``max_num_batched_tokens``; the engine fills in the value it uses.
    max_prefill_tokens: int | None = Field(
        None, ge=16, description="prefill token budget of one step; longer prompts are prefilled in "
                                 "chunks of at most this; default: the backend's chunk size")
    #: ``None``: ``max_prefill_tokens``; the engine fills in the value it uses.
    max_prefill_tokens_decoding: int | None = Field(
        None, ge=16, description="prefill token budget of a step in which running requests also "
                                 "decode (prompts coming in then delay their next token by one "
                                 "such chunk, not a whole burst; it costs throughput: 2048 "
                                 "lowered serve_c64 and serve_mixed by 14 to 16 percent on an "
                                 "H200); default: max_prefill_tokens")
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV blocks of identical prompt prefixes across requests")
    kv_eviction: EvictionName = Field(
        "lru", description="which cached KV blocks the prefix cache gives back first when the pool "
                           "runs short: lru (least recently used), lfu (least reused) or s3fifo "
                           "(S3-FIFO: blocks used once leave first)")
    enforce_eager: bool = Field(
        False, description="run every step eagerly, never through captured graphs (CUDA graphs "
                           "on the CUDA backend)")
    async_scheduling: bool | None = Field(
        None, description="plan and queue each step while the previous one still runs on the "
                          "device, so the host's work per step (outputs, scheduling, inputs) "
                          "overlaps the device's; default: on where the backend runs queued work "
                          "asynchronously (CUDA) and the engine has one rank")
    warmup: bool | None = Field(
        None, description="run a few short synthetic requests at start-up (prompt bursts, "
                          "sampling, penalties, logprobs, grammars) so that kernels compile "
                          "before the first requests instead of while they wait; default: on "
                          "where the backend compiles kernels on first use (CUDA)")
    tensor_parallel_size: int = Field(
        1, ge=1, description="split the model over this many devices (device_index .. +N-1), one "
                             "worker process each")
    # ``sagellm.distributed.disagg``.
    disaggregate_prefill: bool = Field(
        False, description="prefill on a second device (device_index + 1) and hand the KV blocks to "
                           "this one, which decodes")
    device_index: int = Field(0, ge=0, description="the device this engine (its first rank) runs on")

    @model_validator(mode="after")
    def _budgets(self) -> EngineConfig:
        # ``None`` stays None here: the default depends on the backend, known only to the engine.
        if self.max_prefill_tokens is not None and self.max_prefill_tokens > self.max_num_batched_tokens:
            raise ValueError("max_prefill_tokens must not exceed max_num_batched_tokens")
        decoding = self.max_prefill_tokens_decoding
        if decoding is not None and decoding > (self.max_prefill_tokens or self.max_num_batched_tokens):
            raise ValueError("max_prefill_tokens_decoding must not exceed max_prefill_tokens "
                             "(or max_num_batched_tokens)")
        return self

    def with_prefill_budget(self, platform_chunk: int | None) -> EngineConfig:
        """A copy with both prefill budgets set. ``max_prefill_tokens``: as given, else
        ``platform_chunk`` (the backend's default chunk), else ``max_num_batched_tokens``, never
        above the latter. ``max_prefill_tokens_decoding``: as given, else
        ``max_prefill_tokens``."""
        update: dict[str, int] = {}
        chunk = self.max_prefill_tokens
        if chunk is None:
            chunk = update["max_prefill_tokens"] = min(
                platform_chunk or self.max_num_batched_tokens, self.max_num_batched_tokens)
        decoding = min(self.max_prefill_tokens_decoding or chunk, chunk)
        if decoding != self.max_prefill_tokens_decoding:
            update["max_prefill_tokens_decoding"] = decoding
        return self.model_copy(update=update) if update else self
