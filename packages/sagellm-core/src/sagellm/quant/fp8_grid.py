"""The FP8 (``float8_e4m3fn``) grid of a weight and of the activations it multiplies, as plain
tensors.

Weight: ``w[n, k] ~ q[n, k] * scale[n, k // group]``. One column of ``scale`` is one scale per
output row (per channel; a per-tensor scale is that column with one value); ``K / group``
columns are scales per row per ``group`` inputs, which is how a block-wise checkpoint
(``weight_block_size = [bn, bk]``) reads once its block scales are repeated over the ``bn`` rows
of each block (``group = bk``): one layout for all three, so fusing q/k/v or gate/up and
splitting for tensor parallelism are row and column copies, whatever the checkpoint's layout.

Activations: dynamic, per token (per channel weights) or per token and ``group`` inputs
(group-wise weights), so both sides of each partial product have one scale; or static, one
scale from the checkpoint (``input_scale``) for every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8_DTYPE = torch.float8_e4m3fn
#: The largest finite ``float8_e4m3fn`` value.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
#: Smallest scale, so an all-zero row or group quantizes to zeros instead of NaN.
MIN_SCALE = 1e-12


@dataclass
class Fp8Grid:
    q: torch.Tensor                          # float8_e4m3fn [N, K]
    scale: torch.Tensor                      # float32 [N, K // group]
    input_scale: torch.Tensor | None = None  # float32 scalar (static activations) or None

    def __post_init__(self) -> None:
        if self.q.dtype != FP8_DTYPE or self.q.dim() != 2:
            raise ValueError(f"an fp8 weight is a 2-D {FP8_DTYPE} tensor, got {self.q.dtype} "
                             f"{list(self.q.shape)}")
        n, k = self.q.shape
        if self.scale.dim() != 2 or self.scale.shape[0] != n or not self.scale.shape[1] or \
                k % self.scale.shape[1]:
            raise ValueError(f"fp8 weight scales of a [{n}, {k}] weight must be [{n}, G] with G "
                             f"dividing {k}, got {list(self.scale.shape)}")
        if self.input_scale is not None and self.input_scale.numel() != 1:
            raise ValueError(f"a static fp8 input scale is one value, got "
                             f"{list(self.input_scale.shape)}")

    @property
    def group(self) -> int:
        """Inputs per weight scale (``K`` for per-channel scales)."""
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group
        return (self.q.float().view(n, k // g, g) * self.scale.float()[..., None]).view(n, k)


def quantize_fp8(w: torch.Tensor, group: int | None = None) -> Fp8Grid:
    """Round-to-nearest fp8 with one scale per row (``group=None``) or per row and ``group``
    inputs; the largest magnitude of each maps to :data:`FP8_MAX`."""
    n, k = w.shape
    g = k if group is None else group
    if g <= 0 or k % g:
        raise ValueError(f"fp8 needs input features ({k}) divisible by the group size ({g})")
    wg = w.float().view(n, k // g, g)
    scale = (wg.abs().amax(dim=-1) / FP8_MAX).clamp_min(MIN_SCALE)
    q = (wg / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return Fp8Grid(q.view(n, k), scale)


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, block_scales)`` with one scale per ``block = (rows, cols)`` tile (edge tiles
    partial): the layout of ``weight_block_size`` checkpoints (``weight_scale_inv``)."""
    n, k = w.shape
    bn, bk = block
    nb, kb = -(-n // bn), -(-k // bk)
    padded = torch.zeros(nb * bn, kb * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, bn, kb, bk)
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp_min(MIN_SCALE)
    q = (tiles / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb * bn, kb * bk)[:n, :k].contiguous(), scale


def grid_from_blocks(q: torch.Tensor, block_scale: torch.Tensor, block: tuple[int, int],
                     input_scale: torch.Tensor | None = None) -> Fp8Grid | None:
    """The grid of a block-wise weight (``block_scale [ceil(N / bn), ceil(K / bk)]``): each
    block's scale repeated over its rows; ``None`` when ``K`` is not whole blocks (no group
    layout fits the partial last block)."""
    n, k = q.shape
    bn, bk = block
    if k % bk:
        return None
    if tuple(block_scale.shape) != (-(-n // bn), k // bk):
        raise ValueError(f"block scales of a [{n}, {k}] weight in blocks of {list(block)} must "
                         f"be [{-(-n // bn)}, {k // bk}], got {list(block_scale.shape)}")
    scale = block_scale.float().repeat_interleave(bn, dim=0)[:n].contiguous()
    return Fp8Grid(q, scale, input_scale)


def quantize_activations(x: torch.Tensor, group: int, input_scale: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq, xs)`` of ``x [M, K]``: fp8 values and float32 scales ``[M, K // group]``
    (dynamic), or ``[M, 1]`` of the static ``input_scale``."""
    m, k = x.shape
    if input_scale is not None:
        xs = input_scale.float().reshape(1, 1).expand(m, 1)
        xq = (x.float() / xs).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return xq, xs
    xg = x.float().view(m, k // group, group)
    xs = (xg.abs().amax(dim=-1) / FP8_MAX).clamp_min(MIN_SCALE)
    xq = (xg / xs[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq.view(m, k), xs


def dequantize_activations(xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    m, k = xq.shape
    g = k // xs.shape[1]
    return (xq.float().view(m, k // g, g) * xs[..., None]).view(m, k)


def reference_matmul(x: torch.Tensor, grid: Fp8Grid) -> torch.Tensor:
    """W8A8 ``x [M, K] @ W^T`` in float32, the meaning every fp8 kernel must match: ``x``
    quantized as the grid says (dynamic per token or token group, or static), both sides
    dequantized, then one float32 matmul."""
    group = grid.q.shape[1] if grid.input_scale is not None else grid.group
    xq, xs = quantize_activations(x, group, grid.input_scale)
    return dequantize_activations(xq, xs) @ grid.dequantize().t()
