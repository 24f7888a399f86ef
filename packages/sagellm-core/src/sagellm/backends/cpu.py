"""The built-in CPU backend: reference attention in torch, gloo for communication.

It registers through core's own ``sagellm.backends`` entry point, exactly like a third-party
plugin does.
"""

from __future__ import annotations

import os

import torch

from sagellm.backends.cpu_attention import CpuAttentionBackend
from sagellm.backends.torch_comm import TorchDistributedComm
from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.hookspecs import hookimpl
from sagellm.protocols import (
    Availability,
    Capabilities,
    KVCacheSpec,
    MemoryInfo,
    Platform,
    QuantizationRegister,
)

#: Prefill tokens per step by default. SmolLM2-135M on two (shared) cores, best of three: a
#: 128-token chunk took 0.28 s on an empty cache, 0.75 s after a 3k-token prefix and 2.0 s after
#: 7.9k; after 3k, 256 tokens took 2.1 s and 512 took 3.9 s. Attention over the prefix
#: dominates, so 128 keeps a step near a second while other requests decode between chunks.
PREFILL_CHUNK_TOKENS = 128


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"

    @classmethod
    def is_available(cls) -> Availability:
        return Availability.yes(f"{os.cpu_count()} cores, torch {torch.__version__}")

    @classmethod
    def capabilities(cls) -> Capabilities:
        return Capabilities(
            dtypes=(torch.float32, torch.bfloat16, torch.float16),
            default_dtype=torch.float32,
            supports_graphs=False,
            dist_backend="gloo",
            priority=0,
            supports_sliding_window=True,
            supports_logits_soft_cap=True,
            skips_out_of_window_blocks=True,
            prefill_chunk_tokens=PREFILL_CHUNK_TOKENS,
        )

    def memory_info(self) -> MemoryInfo:
        try:
            pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            pages = free = 8 << 30
        return MemoryInfo(free_bytes=free, total_bytes=pages)

    def device_name(self) -> str:
        return f"cpu ({os.cpu_count()} cores)"

    def make_kv_backend(self, spec: KVCacheSpec, num_blocks: int) -> TorchKVBackend:
        return TorchKVBackend(spec, num_blocks, self.device)

    def make_attention_backend(self) -> CpuAttentionBackend:
        return CpuAttentionBackend()

    def make_comm_backend(self, rank: int, world_size: int) -> TorchDistributedComm:
        return TorchDistributedComm(self.device)

    def register_quantizations(self, register: QuantizationRegister) -> None:
        from sagellm.quant.fp8 import Fp8Weight
        from sagellm.quant.int4 import Int4Weight
        from sagellm.quant.int8 import Int8Weight

        register(Int8Weight)
        register(Int4Weight)
        register(Fp8Weight)  # the torch reference: accuracy checks, never picked by auto


@hookimpl
def sagellm_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(CpuPlatform)
