"""A replacement for one of core's swappable layers (``sagellm.layers.registry``).

A real backend puts a fused kernel here; this one computes SiLU-and-mul with two plain torch
ops, which gives the same numbers as core's layer. A replacement overrides ``forward`` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sagellm.layers.activation import SiluAndMul


class ExampleSiluAndMul(SiluAndMul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
