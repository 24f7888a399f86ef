"""The example platform: the CPU as "device", core's torch KV pool and gloo, our own attention,
our own model runner and one replaced layer."""

from __future__ import annotations

import os

import torch

from sagellm.backends.torch_comm import TorchDistributedComm
from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.layers.registry import LayerKind
from sagellm.protocols import (
    Availability,
    Capabilities,
    KVCacheSpec,
    LayerRegister,
    MemoryInfo,
    Platform,
)
from sagellm.runner import RunnerContext
from sagellm_example_backend.attention import ExampleAttention
from sagellm_example_backend.layers import ExampleSiluAndMul
from sagellm_example_backend.runner import ExampleModelRunner

#: Set to anything to make the backend report itself unavailable (shows how reasons surface).
DISABLE_ENV = "SAGELLM_EXAMPLE_DISABLE"


class ExamplePlatform(Platform):
    name = "example"
    device_type = "cpu"
    #: The contract version this backend was written and tested against.
    contract_version = 2

    @classmethod
    def is_available(cls) -> Availability:
        # Never raise here: discovery calls this for every installed backend. A real backend
        # imports its vendor library inside a try and turns every failure into a reason.
        if os.environ.get(DISABLE_ENV):
            return Availability.no(f"disabled by {DISABLE_ENV}")
        return Availability.yes("example backend on the CPU")

    @classmethod
    def capabilities(cls) -> Capabilities:
        # A negative priority keeps `--backend auto` on the built-in CPU backend.
        return Capabilities(dtypes=(torch.float32, torch.bfloat16), default_dtype=torch.float32,
                            dist_backend="gloo", priority=-10)

    def memory_info(self) -> MemoryInfo:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return MemoryInfo(free_bytes=free, total_bytes=total)

    def device_name(self) -> str:
        return "example (cpu)"

    def make_kv_backend(self, spec: KVCacheSpec, num_blocks: int) -> TorchKVBackend:
        return TorchKVBackend(spec, num_blocks, self.device)

    def make_attention_backend(self) -> ExampleAttention:
        return ExampleAttention()

    def make_comm_backend(self, rank: int, world_size: int) -> TorchDistributedComm:
        return TorchDistributedComm(self.device)

    # Both optional: without them core's runner and layers run.

    def register_layers(self, register: LayerRegister) -> None:
        register(LayerKind.SILU_AND_MUL, ExampleSiluAndMul)

    def make_model_runner(self, ctx: RunnerContext) -> ExampleModelRunner:
        return ExampleModelRunner(ctx)
