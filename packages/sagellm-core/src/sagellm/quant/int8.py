"""int8 weights, one scale per output row, on torch's CPU kernel ``_weight_int8pack_mm``.

The kernel's fast path takes bfloat16 activations (float32 ones fall back to a slow
reference loop), so the product runs in bfloat16 and returns in the caller's dtype. Long inputs
(prefill) go through a dense GEMM on the int8 values instead (:mod:`sagellm.quant.prefill`).

As an LM head its bfloat16 logits are too coarse for greedy decoding: at a logit of 20 one
bfloat16 step is 0.125, and SmolLM2's first answer token to "What is the capital of France?"
leads the runner-up by 0.08 nats in float32, so the int4 model (int8 head) tied them and took
the wrong one. The head recomputes its :data:`REFINED_LOGITS` largest logits per row in float32
from the int8 rows (a gather of that many rows), which orders the candidates that greedy
decoding, top-k/top-p and logprobs look at; the rest keep bfloat16 resolution.
"""

from __future__ import annotations

import torch

from sagellm.layers.quant_linear import QuantizedWeight
from sagellm.quant.cpu_features import has_fast_bf16
from sagellm.quant.grids import Int8Grid, quantize_int8
from sagellm.quant.prefill import dense_matmul

COMPUTE_DTYPE = torch.bfloat16
#: Logits per row that an LM head recomputes in float32 (more than a bfloat16 step's worth of
#: near-ties; a gather of 16 rows of the head costs well under 1% of a decode step).
REFINED_LOGITS = 16


class Int8Weight(QuantizedWeight):
    scheme = "int8"
    #: Rows from which the dense GEMM path wins (int8 -> bfloat16 is one cheap cast; measured
    #: with native bfloat16 in sagellm.quant.prefill).
    dense_min_tokens = 16

    def __init__(self, grid: Int8Grid) -> None:
        self.q = grid.q.contiguous()
        self.scale = grid.scale.to(COMPUTE_DTYPE)
        self.refine: torch.Tensor | None = None  # float32 row scales, for an LM head

    def as_lm_head(self) -> None:
        self.refine = self.scale.float()

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Weight:
        return cls(quantize_int8(weight))

    @classmethod
    def from_grid(cls, grid: object) -> Int8Weight | None:
        return cls(grid) if isinstance(grid, Int8Grid) else None

    @classmethod
    def runs_fast(cls) -> bool:
        return has_fast_bf16()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] >= self.dense_min_tokens:
            # int8 values are exact in the dense dtype; the row scale applies to the product.
            y = dense_matmul(x2, self.q, self.scale)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(COMPUTE_DTYPE), self.q, self.scale)
            y = y.to(x.dtype)
        if self.refine is not None:
            top = y.topk(min(REFINED_LOGITS, y.shape[-1]), dim=-1).indices  # [tokens, R]
            exact = torch.einsum("tri,ti->tr", self.q[top].float(), x2.float()) * self.refine[top]
            y.scatter_(-1, top, exact.to(y.dtype))
        return y.view(*lead, y.shape[-1])

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()
