"""CNCL communication: ``torch.distributed`` with the ``cncl`` backend registered by torch_mlu."""

from __future__ import annotations

import torch

from sagellm.backends.torch_comm import TorchDistributedComm


class MluComm(TorchDistributedComm):
    """The shared ``torch.distributed`` backend; only the device sync for exact timings differs."""

    def _done(self) -> None:
        if self._sync and self.device.type == "mlu":
            torch.mlu.synchronize(self.device)  # type: ignore[attr-defined]
