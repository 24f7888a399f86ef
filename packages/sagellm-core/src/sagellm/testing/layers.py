"""Checks that a backend's replacement for a swappable layer computes what core's layer does."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from sagellm.layers.activation import SiluAndMul
from sagellm.layers.moe import MoEExperts
from sagellm.layers.norm import RMSNorm
from sagellm.layers.registry import LayerKind, check_replacement, swap_layers
from sagellm.layers.rotary import RotaryEmbedding

Args = tuple[torch.Tensor | None, ...]


def layer_cases(kind: LayerKind, device: torch.device, dtype: torch.dtype, seed: int = 0
                ) -> Iterator[tuple[nn.Module, Args]]:
    """Core's layer of ``kind`` with random state, and inputs to call it with, on ``device``."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    tokens = 7
    if kind is LayerKind.RMS_NORM:
        norm = RMSNorm(96, eps=1e-5)
        norm.weight.data = torch.randn(96, generator=g).to(device, dtype)
        yield norm, (rand(tokens, 96), None)
        yield norm, (rand(tokens, 96), rand(tokens, 96))
    elif kind is LayerKind.SILU_AND_MUL:
        yield SiluAndMul(), (rand(tokens, 2 * 80),)
        yield SiluAndMul(), (rand(2, 3, 2 * 16),)
    elif kind is LayerKind.ROTARY_EMBEDDING:
        rope = RotaryEmbedding(head_dim=32, max_position=64, base=10000.0).to(device)
        positions = torch.randint(0, 64, (tokens,), generator=g).to(device)
        yield rope, (positions, rand(tokens, 4, 32), rand(tokens, 2, 32))
    elif kind is LayerKind.MOE_EXPERTS:
        # Mixtral-like (renormalised top-2 of 8) and Qwen3-MoE-like (top-3 of 4, not
        # renormalised), one token and several; sizes not multiples of a kernel's block.
        for experts, top_k, renorm, hidden, inter, n in ((8, 2, True, 64, 48, tokens),
                                                         (4, 3, False, 40, 24, 1)):
            moe = MoEExperts(experts, top_k, hidden, inter, renorm).to(device, dtype)
            moe.w13.data = (rand(experts, 2 * inter, hidden) * hidden ** -0.5)
            moe.w2.data = (rand(experts, hidden, inter) * inter ** -0.5)
            yield moe, (rand(n, hidden), rand(n, experts))
    else:  # pragma: no cover - a new kind needs its case here
        raise NotImplementedError(f"no test case for {kind}")


def _flat(out: object) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]  # type: ignore[list-item]


def check_layer_replacement(kind: LayerKind, replacement: type[nn.Module], device: torch.device,
                            dtype: torch.dtype, tol: float) -> None:
    """Swap ``replacement`` into a copy of each case's core layer; outputs must match core's."""
    spec = check_replacement(kind, replacement)
    for ref, args in layer_cases(kind, device, dtype):
        swapped = copy.deepcopy(ref)
        assert swap_layers(swapped, {spec.base: replacement}) == 1
        assert type(swapped) is replacement
        # Clones: a replacement may work in place (rotary does).
        want = _flat(ref(*[a.clone() if a is not None else None for a in args]))
        got = _flat(swapped(*[a.clone() if a is not None else None for a in args]))
        assert len(got) == len(want), f"{replacement.__qualname__} returns {len(got)} tensors"
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
            torch.testing.assert_close(g.float().cpu(), w.float().cpu(), atol=tol, rtol=tol,
                                       msg=lambda m: f"{replacement.__qualname__} ({kind.name}): {m}")
