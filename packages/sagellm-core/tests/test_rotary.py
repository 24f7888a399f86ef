"""The torch rotary embedding: the rotate-half formula, bit for bit, from the shared table."""

from __future__ import annotations

import pytest
import torch

from sagellm.layers.rotary import RotaryEmbedding


def _explicit(x: torch.Tensor, cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    cs = cos_sin[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_the_rotate_half_formula(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(64, 256, 10000.0)
    q = torch.randn(6, 9, 64, generator=g).to(dtype)
    k = torch.randn(6, 3, 64, generator=g).to(dtype)
    pos = torch.tensor([0, 1, 17, 100, 200, 255])
    with torch.inference_mode():
        rq, rk = rope(pos, q, k)
    assert rq.dtype == dtype and rk.dtype == dtype
    assert torch.equal(rq, _explicit(q, rope.cos_sin, pos))
    assert torch.equal(rk, _explicit(k, rope.cos_sin, pos))
    assert not torch.equal(rq[1:], q[1:])  # position 0 is the identity, the others are not


def test_layers_share_one_derived_table_usable_outside_inference_mode() -> None:
    a, b = RotaryEmbedding(32, 64, 500.0), RotaryEmbedding(32, 64, 500.0)
    assert a.cos_sin is b.cos_sin
    q, k = torch.randn(2, 4, 32), torch.randn(2, 2, 32)
    pos = torch.tensor([3, 60])
    with torch.inference_mode():  # made on first use, inside the engine's inference mode
        a(pos, q, k)
    table = a.cos_sin._rotate_half  # type: ignore[attr-defined]
    assert b.cos_sin._rotate_half is table and not table.is_inference()  # type: ignore[attr-defined]
    q.requires_grad_(True)
    rq, _ = b(pos, q, k)  # autograd may record it: the table is a normal tensor
    rq.sum().backward()
    assert q.grad is not None
