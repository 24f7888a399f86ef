"""Mixture-of-experts: the router's top-k choice and the experts' gated MLPs, stacked per expert.

Expert weights live in two tensors per layer, ``w13`` [E, 2I, H] (each expert's gate rows, then
its up rows) and ``w2`` [E, H, I], so a forward is a handful of ops whatever E is and a backend's
grouped GEMM reads them as they are. Checkpoints store one tensor per expert and projection; the
weight loader copies each into its slice once, at load time.

Under tensor parallelism every rank holds every expert, cut along the intermediate dimension
(like a dense MLP's column/row split): a rank's :class:`MoEExperts` returns a partial sum that
:class:`SparseMoEBlock` all-reduces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sagellm.layers.linear import ColumnParallelLinear
from sagellm.layers.parallel import SINGLE, TPGroup

#: Checkpoint projection name -> (stacked parameter, part). Mixtral names w1/w3/w2, the
#: Qwen MoE families gate_proj/up_proj/down_proj.
EXPERT_PROJECTIONS = {
    "w1": ("w13", "gate"), "gate_proj": ("w13", "gate"),
    "w3": ("w13", "up"), "up_proj": ("w13", "up"),
    "w2": ("w2", "down"), "down_proj": ("w2", "down"),
}


def check_moe_config(num_experts: int, top_k: int) -> None:
    """Refuse a routing the layer cannot run, naming the config fields."""
    if num_experts < 1:
        raise ValueError(f"the number of experts ({num_experts}) must be at least 1")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok ({top_k}) must be between 1 and the number of "
                         f"experts ({num_experts})")


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, then each token's ``top_k``: weights [T, k] float32 and expert ids
    [T, k] int64. With ``renormalize`` the chosen weights are rescaled to sum to one."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


def experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``sum_k weight_k * down_e(silu(gate_e(x)) * up_e(x))`` for each token's chosen ``e``.

    The (token, choice) pairs are sorted by expert, so each expert with work runs one pair of
    matmuls over all its rows (a loop over experts, never over tokens). Reads the expert counts
    on the host: a reference and CPU path, not one for CUDA graphs.
    """
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    rows = x[token_of]
    out_rows = torch.empty(rows.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            gate, up = F.linear(rows[start:start + n], w13[e]).chunk(2, -1)
            out_rows[start:start + n] = F.linear(F.silu(gate) * up, w2[e]).float()
            start += n
    out_rows *= topk_weights.reshape(-1)[order, None].float()
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token_of, out_rows).to(x.dtype)


class MoEExperts(nn.Module):
    """The experts of one MoE layer with their routing: ``forward(x [T, H], router_logits
    [T, E]) -> [T, H]``, this rank's partial sum over its slice of the intermediate dimension.

    The swappable unit (``LayerKind.MOE_EXPERTS``): a backend's grouped-GEMM kernel replaces
    ``forward`` and reads ``w13``, ``w2``, ``top_k`` and ``renormalize``.
    """

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int,
                 renormalize: bool, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        check_moe_config(num_experts, top_k)
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.tp = tp
        self.intermediate_per_rank = n = tp.shard(intermediate, "moe intermediate size")
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * n, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, n), requires_grad=False)
        for p in (self.w13, self.w2):
            p.weight_loader = self._load  # type: ignore[attr-defined]
        # Which (expert, gate/up/down) slices a checkpoint has filled; on the host, load time only.
        self._filled = torch.zeros(num_experts, 3, dtype=torch.bool, device="cpu")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return experts_reference(x, self.w13, self.w2, weights, ids)

    # -- loading -----------------------------------------------------------------------------

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """``shard_id`` is ``(part, expert)`` with part gate/up/down for one expert's [I, H] or
        [H, I] tensor, or ``(part, None)`` with part gate_up/down for all experts at once
        ([E, 2I, H] with gate rows first, or [E, H, I])."""
        part, expert = shard_id  # type: ignore[misc]
        n, r = self.intermediate_per_rank, self.tp.rank
        full = self.tp.size * n
        if expert is None:
            if part == "gate_up":
                self._expect(loaded, (self.num_experts, 2 * full, param.shape[2]), part)
                gate, up = loaded.split(full, 1)
                param.data[:, :n].copy_(gate.narrow(1, r * n, n))
                param.data[:, n:].copy_(up.narrow(1, r * n, n))
                self._filled[:, :2] = True
            else:
                self._expect(loaded, (self.num_experts, param.shape[1], full), part)
                param.data.copy_(loaded.narrow(2, r * n, n))
                self._filled[:, 2] = True
            return
        e = int(expert)
        if not 0 <= e < self.num_experts:
            raise ValueError(f"checkpoint has expert {e}, but the config has {self.num_experts}")
        if part == "down":
            self._expect(loaded, (param.shape[1], full), f"expert {e} {part}")
            param.data[e].copy_(loaded.narrow(1, r * n, n))
            self._filled[e, 2] = True
        else:
            self._expect(loaded, (full, param.shape[2]), f"expert {e} {part}")
            off = 0 if part == "gate" else n
            param.data[e, off:off + n].copy_(loaded.narrow(0, r * n, n))
            self._filled[e, 0 if part == "gate" else 1] = True

    @staticmethod
    def _expect(loaded: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        if tuple(loaded.shape) != shape:
            raise ValueError(f"checkpoint {what} weight has shape {tuple(loaded.shape)}, the "
                             f"config implies {shape}")

    def missing_weights(self) -> list[str]:
        """``"expert 3 up"``-style names of the slices no checkpoint tensor has filled."""
        parts = ("gate", "up", "down")
        return [f"expert {e} {parts[j]}" for e, j in (~self._filled).nonzero().tolist()]


class SparseMoEBlock(nn.Module):
    """Router plus experts in place of a dense MLP: ``forward(x [T, H]) -> [T, H]``."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int,
                 renormalize: bool, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        # Every rank routes every token itself (the router is tiny), so it is not split.
        self.gate = ColumnParallelLinear(hidden, num_experts, tp=SINGLE)
        self.experts = MoEExperts(num_experts, top_k, hidden, intermediate, renormalize, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.experts(x, self.gate(x))
        if self.tp.size > 1:
            assert self.tp.comm is not None
            y = self.tp.comm.all_reduce(y)
        return y


def expert_target(name: str) -> tuple[str, tuple[str, int | None]] | None:
    """Where an expert tensor of a checkpoint goes: ``(parameter name, shard id)``, else None.

    ``layers.0.mlp.experts.3.gate_proj.weight`` -> ``("layers.0.mlp.experts.w13", ("gate", 3))``;
    already-stacked ``...experts.gate_up_proj`` [E, 2I, H] and ``...experts.down_proj``
    [E, H, I] map to ``("gate_up", None)`` and ``("down", None)``.
    """
    head, sep, tail = name.partition(".experts.")
    if not sep:
        return None
    parts = tail.split(".")
    if len(parts) == 1 and parts[0] in ("gate_up_proj", "down_proj"):
        stacked = "w13" if parts[0] == "gate_up_proj" else "w2"
        return f"{head}.experts.{stacked}", ("gate_up" if stacked == "w13" else "down", None)
    if len(parts) == 3 and parts[0].isdigit() and parts[2] == "weight" \
            and parts[1] in EXPERT_PROJECTIONS:
        stacked, part = EXPERT_PROJECTIONS[parts[1]]
        return f"{head}.experts.{stacked}", (part, int(parts[0]))
    return None
