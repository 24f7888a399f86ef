"""NCCL communication: core's ``torch.distributed`` backend on the ``nccl`` process group.

All collectives run on the current CUDA stream, so they are captured by CUDA graphs like any
other kernel. ``sync=True`` makes the bandwidth statistics exact at the cost of a device
synchronisation per operation (benchmarks of the transfers themselves use it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sagellm.backends.torch_comm import TorchDistributedComm


class NcclComm(TorchDistributedComm):
    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None,
                 sync: bool = False) -> None:
        super().__init__(device, group, sync, synchronize=lambda: torch.cuda.synchronize(device))
        backend = dist.get_backend(group)
        if backend != "nccl":
            raise RuntimeError(f"NcclComm needs an nccl process group, this one is {backend!r}")
