from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a fused ``[gate | up]`` input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, -1)
        # In place on silu's output: one [tokens, intermediate] temporary fewer at the peak.
        return F.silu(gate).mul_(up)


class GeluTanhAndMul(nn.Module):
    """``gelu(gate, approximate="tanh") * up`` for a fused ``[gate | up]`` input (GeGLU, Gemma)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, -1)
        return F.gelu(gate, approximate="tanh").mul_(up)


#: HF ``hidden_act`` / ``hidden_activation`` names of the gated MLP activations we run.
GATED_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul,
    "gelu_tanh": GeluTanhAndMul,
}


def gated_activation(name: str) -> nn.Module:
    """The gated activation an HF config names; ``ValueError`` for one we do not run."""
    cls = GATED_ACTIVATIONS.get(name)
    if cls is None:
        raise ValueError(f"activation {name!r} is not supported; supported: "
                         f"{', '.join(sorted(GATED_ACTIVATIONS))}")
    return cls()
