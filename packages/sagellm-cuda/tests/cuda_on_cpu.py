"""This package's parts on the CPU, for CI without a GPU.

:class:`CudaPartsOnCpu` is core's CPU platform whose KV pool, attention, fused layers and model
runner come from :class:`CudaPlatform`'s own factories: :class:`CudaKVBackend`'s one-tensor pool,
the Triton kernels (run by Triton's interpreter, see ``conftest.py``), the fused layers, the
logprobs kernel and :class:`CudaGraphModelRunner`. Device queries, host transfers and communication stay the CPU
platform's (pinned memory, CUDA events and NCCL do not exist here).

The runner's graphs come from :class:`ReplayCapture`: a replay re-runs the captured forward on
the runner's static buffers, which computes what a CUDA graph replay of it computes. So the
runner's host logic runs for real (which steps replay, bucket padding, the staging buffers,
sampling from the graph's outputs); what this cannot show is a kernel that is unsafe to capture
(a host sync, a shape read at capture time), which only the GPU run (``-m gpu``) checks.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.runner import RunnerContext
from sagellm_cuda.graphs import CudaGraphCapture, CudaGraphModelRunner
from sagellm_cuda.plugin import CudaPlatform


class ReplayedForward:
    """A "graph" whose replay runs the forward again."""

    def __init__(self, forward: Callable[[], None]) -> None:
        self.forward = forward
        self.num_replays = 0

    def replay(self) -> None:
        self.num_replays += 1
        self.forward()


class ReplayCapture(CudaGraphCapture):
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = None

    def capture(self, forward: Callable[[], None]) -> ReplayedForward:
        # No warm-up run: on the GPU it only compiles, and here every forward costs interpreter
        # time (a runner captures one graph per batch size up to max_num_seqs).
        return ReplayedForward(forward)

    def synchronize(self) -> None:
        pass


class ReplayGraphRunner(CudaGraphModelRunner):
    graph_capture = ReplayCapture

    def __init__(self, ctx: RunnerContext) -> None:
        super().__init__(ctx)
        # The runner freezes what exists at start-up for a serving process's lifetime; a test
        # process builds many engines and must be able to free the earlier ones.
        gc.unfreeze()


class CudaPartsOnCpu(CpuPlatform):
    name = "cuda-parts-on-cpu"

    make_kv_backend = CudaPlatform.make_kv_backend
    make_attention_backend = CudaPlatform.make_attention_backend
    register_layers = CudaPlatform.register_layers
    logprobs = CudaPlatform.logprobs

    def make_model_runner(self, ctx: RunnerContext) -> ReplayGraphRunner:
        return ReplayGraphRunner(ctx)
