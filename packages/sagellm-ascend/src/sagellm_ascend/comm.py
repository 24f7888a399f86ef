"""HCCL communication: ``torch.distributed`` with the ``hccl`` backend registered by torch_npu."""

from __future__ import annotations

import torch

from sagellm.backends.torch_comm import TorchDistributedComm


class AscendComm(TorchDistributedComm):
    """The shared ``torch.distributed`` backend; only the device sync for exact timings differs."""

    def _done(self) -> None:
        if self._sync and self.device.type == "npu":
            torch.npu.synchronize(self.device)  # type: ignore[attr-defined]
