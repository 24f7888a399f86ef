"""GENERATED from ``sagellm.config.EngineConfig`` by ``python -m sagellm.engine_flags``: do not edit.

The flags of ``sagellm.engine_flags`` read this, so that ``--help`` needs no pydantic;
a test fails while it differs from the model.
"""

from __future__ import annotations

from typing import Any

FIELDS: tuple[dict[str, Any], ...] = (
    {'name': 'model', 'kind': 'str', 'default': None, 'help': "HF model directory, .gguf file or Hugging Face Hub repo id (owner/name, fetched into the Hub's cache; HF_HUB_OFFLINE=1 reads the cache only); default: the embedded SmolLM2-135M-Instruct", 'choices': None},
    {'name': 'revision', 'kind': 'str', 'default': None, 'help': 'Hub revision of a repo-id model (branch, tag or commit); default: main', 'choices': None},
    {'name': 'tokenizer', 'kind': 'str', 'default': None, 'help': "tokenizer directory, if not the model's own", 'choices': None},
    {'name': 'backend', 'kind': 'str', 'default': 'auto', 'help': 'hardware backend by name (see `sagellm backends`); auto picks the single available accelerator, else the CPU', 'choices': None},
    {'name': 'dtype', 'kind': 'str', 'default': 'auto', 'help': "weights and activations: auto (the backend's default), float32, bfloat16 or float16", 'choices': None},
    {'name': 'load_format', 'kind': 'str', 'default': 'auto', 'help': 'how to read the weights (dummy: random weights, for load tests)', 'choices': ('auto', 'hf', 'safetensors', 'gguf', 'dummy')},
    {'name': 'quantization', 'kind': 'str', 'default': 'none', 'help': "quantization on load: int8 (weights only, per output channel) or int4 (groups of 32 on the CPU, 128 on CUDA), where the backend runs it; fp8: fp8 weights (per output channel, or an FP8 checkpoint's own scales) and activations (per token); auto runs a GGUF file, a GPTQ/AWQ/compressed-tensors 4-bit directory or an FP8 checkpoint from its stored weights where the backend has fast kernels for them (the embedded model on the CPU: int4), anything else as loaded; none: as loaded (a quantized checkpoint dequantized)", 'choices': ('auto', 'none', 'int8', 'int4', 'fp8')},
    {'name': 'seed', 'kind': 'int', 'default': 0, 'help': 'engine random seed (also the random weights of load_format dummy)', 'choices': None},
    {'name': 'max_model_len', 'kind': 'int', 'default': None, 'help': "context length (prompt + completion); default: the model's own", 'choices': None},
    {'name': 'block_size', 'kind': 'int', 'default': 16, 'help': 'tokens per KV cache block', 'choices': None},
    {'name': 'gpu_memory_utilization', 'kind': 'float', 'default': 0.85, 'help': 'fraction of device memory the engine may use (weights, activations, KV cache)', 'choices': None},
    {'name': 'num_kv_blocks', 'kind': 'int', 'default': None, 'help': 'fixed KV pool size in blocks, instead of sizing it from memory', 'choices': None},
    {'name': 'cpu_kv_cache_bytes', 'kind': 'int', 'default': 1073741824, 'help': 'KV pool size in bytes for the CPU backend (which does not profile memory)', 'choices': None},
    {'name': 'max_num_seqs', 'kind': 'int', 'default': 256, 'help': 'most requests decoded together in one step (the running batch)', 'choices': None},
    {'name': 'max_num_batched_tokens', 'kind': 'int', 'default': 8192, 'help': 'token budget of one engine step (prefill chunks plus decodes)', 'choices': None},
    {'name': 'max_prefill_tokens', 'kind': 'int', 'default': None, 'help': "prefill token budget of one step; longer prompts are prefilled in chunks of at most this; default: the backend's chunk size", 'choices': None},
    {'name': 'max_prefill_tokens_decoding', 'kind': 'int', 'default': None, 'help': 'prefill token budget of a step in which running requests also decode (prompts coming in then delay their next token by one such chunk, not a whole burst; it costs throughput: 2048 lowered serve_c64 and serve_mixed by 14 to 16 percent on an H200); default: max_prefill_tokens', 'choices': None},
    {'name': 'enable_prefix_caching', 'kind': 'bool', 'default': True, 'help': 'reuse the KV blocks of identical prompt prefixes across requests', 'choices': None},
    {'name': 'kv_eviction', 'kind': 'str', 'default': 'lru', 'help': 'which cached KV blocks the prefix cache gives back first when the pool runs short: lru (least recently used), lfu (least reused) or s3fifo (S3-FIFO: blocks used once leave first)', 'choices': ('lru', 'lfu', 's3fifo')},
    {'name': 'enforce_eager', 'kind': 'bool', 'default': False, 'help': 'run every step eagerly, never through captured graphs (CUDA graphs on the CUDA backend)', 'choices': None},
    {'name': 'async_scheduling', 'kind': 'bool', 'default': None, 'help': "plan and queue each step while the previous one still runs on the device, so the host's work per step (outputs, scheduling, inputs) overlaps the device's; default: on where the backend runs queued work asynchronously (CUDA) and the engine has one rank", 'choices': None},
    {'name': 'warmup', 'kind': 'bool', 'default': None, 'help': 'run a few short synthetic requests at start-up (prompt bursts, sampling, penalties, logprobs, grammars) so that kernels compile before the first requests instead of while they wait; default: on where the backend compiles kernels on first use (CUDA)', 'choices': None},
    {'name': 'tensor_parallel_size', 'kind': 'int', 'default': 1, 'help': 'split the model over this many devices (device_index .. +N-1), one worker process each', 'choices': None},
    {'name': 'disaggregate_prefill', 'kind': 'bool', 'default': False, 'help': 'prefill on a second device (device_index + 1) and hand the KV blocks to this one, which decodes', 'choices': None},
    {'name': 'device_index', 'kind': 'int', 'default': 0, 'help': 'the device this engine (its first rank) runs on', 'choices': None},
)
