"""Without a GPU, the Triton kernels run in Triton's interpreter on the CPU (numerically the same
program, no CUDA), so CI checks every kernel against the torch reference too. Must be set before
the kernels are defined, hence here."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
