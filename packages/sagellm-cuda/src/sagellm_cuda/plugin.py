"""Hook implementations of sagellm-cuda and the CUDA :class:`~sagellm.protocols.Platform`.

Importing this module touches neither the GPU nor Triton: discovery must stay cheap and must work
on machines without CUDA, where :meth:`CudaPlatform.is_available` explains what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sagellm.backends.accelerator import Probe, TorchAcceleratorPlatform
from sagellm.hookspecs import hookimpl
from sagellm.protocols import Availability, Capabilities, KVCacheSpec, LayerRegister, QuantizationRegister

if TYPE_CHECKING:
    from sagellm.layers.logprobs import LogprobTensors
    from sagellm.runner import RunnerContext
    from sagellm_cuda.attention import TritonAttentionBackend
    from sagellm_cuda.comm import NcclComm
    from sagellm_cuda.graphs import CudaGraphModelRunner
    from sagellm_cuda.kv import CudaKVBackend

#: Set to 1 to keep core's torch layers (no fused kernels).
NO_FUSION_ENV = "SAGELLM_CUDA_NO_FUSION"


def cuda_availability() -> Availability:
    """Why CUDA can or cannot be used here; never raises."""
    try:
        if torch.version.cuda is None:
            return Availability.no(
                f"torch {torch.__version__} is a build without CUDA: install a CUDA build of torch "
                f"(e.g. from https://download.pytorch.org/whl/cu128)")
        try:
            count = torch.cuda.device_count()
            if count:
                torch.cuda.get_device_properties(0)
        except Exception as exc:  # driver missing or broken
            return Availability.no(f"CUDA driver error: {exc}")
        if count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            extra = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            if not torch.cuda.is_available():
                return Availability.no(f"no CUDA device visible{extra}, or the NVIDIA driver is "
                                       f"not loaded (torch built for CUDA {torch.version.cuda})")
            return Availability.no(f"no CUDA device visible{extra}")
        try:
            import triton  # noqa: F401
        except Exception as exc:
            return Availability.no(f"triton is not importable ({exc}): pip install triton")
        props = torch.cuda.get_device_properties(0)
        if props.major < 7:
            return Availability.no(f"{props.name} has compute capability {props.major}."
                                   f"{props.minor}; the Triton kernels need 7.0 or newer")
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(count))
        return Availability.yes(f"{count} device(s): {names}; torch {torch.__version__}, "
                                f"CUDA {torch.version.cuda}")
    except Exception as exc:  # pragma: no cover - belt and braces: never raise from here
        return Availability.no(f"CUDA check failed: {type(exc).__name__}: {exc}")


class CudaPlatform(TorchAcceleratorPlatform):
    """NVIDIA GPUs: device queries come from core's accelerator base (``torch.cuda``)."""

    name = "cuda"
    device_type = "cuda"
    vendor_name = "CUDA"

    @classmethod
    def probe(cls) -> Probe:
        found = cuda_availability()
        return Probe(found.available, found.reason)

    @classmethod
    def device_capabilities(cls) -> Capabilities:
        return Capabilities(
            dtypes=(torch.bfloat16, torch.float16, torch.float32),
            default_dtype=torch.bfloat16,
            supports_graphs=True,
            dist_backend="nccl",
            priority=100,
            supports_sliding_window=True,
            supports_logits_soft_cap=True,
            skips_out_of_window_blocks=True,
            async_steps=True,
            compiles_on_first_use=True,
        )

    def make_kv_backend(self, spec: KVCacheSpec, num_blocks: int) -> CudaKVBackend:
        from sagellm_cuda.kv import CudaKVBackend

        return CudaKVBackend(spec, num_blocks, self.device)

    def make_attention_backend(self) -> TritonAttentionBackend:
        from sagellm_cuda.attention import TritonAttentionBackend

        return TritonAttentionBackend()

    def make_comm_backend(self, rank: int, world_size: int) -> NcclComm:
        from sagellm_cuda.comm import NcclComm

        return NcclComm(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        # Only copies from page-locked memory overlap with the GPU's work.
        return host.pin_memory().to(self.device, non_blocking=True)

    def fetch_ids(self, ids: torch.Tensor) -> list[int]:
        """Wait for the ids in ``Event.synchronize``, which releases the interpreter lock
        (``tensor.tolist()`` would hold it for the whole step), so the server's event loop runs
        while the GPU works."""
        return self.start_fetch(ids)()

    def start_fetch(self, ids: torch.Tensor) -> Callable[[], list[int]]:
        """A non-blocking copy into page-locked memory behind an event; the returned wait is
        ``Event.synchronize`` (interpreter lock released) and then the list."""
        host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def wait() -> list[int]:
            done.synchronize()
            return host.tolist()  # type: ignore[no-any-return]

        return wait

    def record_event(self) -> torch.cuda.Event:
        """Copies from page-locked memory run when the stream reaches them, after the call."""
        event = torch.cuda.Event()
        event.record()
        return event

    def logprobs(self, logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobTensors:
        """Two Triton launches that read the logits once (:mod:`sagellm_cuda.logprobs_kernel`)
        instead of ``log_softmax``, ``topk`` and a rank count over them; ties among the
        alternatives come lowest id first."""
        from sagellm_cuda.logprobs_kernel import topk_logprobs

        return topk_logprobs(logits, token_ids, k)

    def register_layers(self, register: LayerRegister) -> None:
        """This package's fused norm, activation, rotary and mixture-of-experts kernels (before
        profiling, so the KV pool is sized for the model that runs)."""
        if os.environ.get(NO_FUSION_ENV) == "1":
            return
        from sagellm_cuda.fused import register_fused_layers

        register_fused_layers(register)

    def register_quantizations(self, register: QuantizationRegister) -> None:
        """int4: 4-bit weights in groups, 16-bit activations, through the Triton dequant-GEMM
        (GPTQ/AWQ/compressed-tensors checkpoints repacked, anything else quantized on load);
        fp8 (W8A8, :mod:`sagellm_cuda.fp8`) on GPUs with fp8 tensor cores (8.9+), elsewhere
        ``--quantization fp8`` is refused, naming what the backend runs."""
        from sagellm_cuda.fp8 import CudaFp8Weight, fp8_capable
        from sagellm_cuda.int4_gemm import TritonW4A16Weight

        register(TritonW4A16Weight)
        if fp8_capable(self.device.index or 0):
            register(CudaFp8Weight)

    def make_model_runner(self, ctx: RunnerContext) -> CudaGraphModelRunner:
        """A runner that replays decode and single-prompt prefill steps as CUDA graphs."""
        from sagellm_cuda import jit_watch
        from sagellm_cuda.graphs import CudaGraphModelRunner

        jit_watch.install()
        return CudaGraphModelRunner(ctx)


@hookimpl
def sagellm_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    register(CudaPlatform)


@hookimpl
def sagellm_engine_started(engine_info: dict[str, object]) -> None:
    """An engine has warmed up: a Triton compile from now on is one that requests waited for
    (logged by :mod:`sagellm_cuda.jit_watch`)."""
    from sagellm_cuda import jit_watch

    jit_watch.engine_started()
