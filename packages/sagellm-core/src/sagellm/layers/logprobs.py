"""Log probabilities of chosen tokens, their rank and the top alternatives, batched on the device.

Which distribution: the model's own, ``log_softmax`` of the logits as the model produced them,
before the min-tokens ban, a structured-output mask, penalties, logit bias, temperature and
top-k/top-p/min-p. So the logprobs of a sequence sum to its log-likelihood under the model
whatever the sampling settings, and they match what vLLM reports by default; a token the
sampler could not have chosen (masked out) still gets its model logprob.

Computing them is the platform's ``Platform.logprobs`` (a :data:`LogprobsOp`); the default is
:func:`torch_logprobs`, and a backend may run the same in fewer passes over the logits.

Getting them to the host is one copy: :meth:`LogprobTensors.pack` lays every field out in one
int64 tensor (float32 values by their bits, so they come back exactly), which the model runner
appends to the step's sampled ids and fetches with them in the step's single wait
(``Platform.fetch_ids``); :func:`unpack_logprobs` turns the host values into
:class:`~sagellm.outputs.TokenLogprob` objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sagellm.outputs import TokenLogprob


@dataclass
class LogprobTensors:
    """Device tensors for ``R`` chosen tokens; :meth:`to_list` brings them to the host."""

    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor  # [R] float32
    ranks: torch.Tensor  # [R] int64
    top_ids: torch.Tensor  # [R, k] int64
    top_logprobs: torch.Tensor  # [R, k] float32

    @property
    def num_top(self) -> int:
        return int(self.top_ids.shape[1])

    def pack(self) -> torch.Tensor:
        """Every field in one int64 device tensor, ``R * (3 + 2k)`` long, row after row:
        ``[token, logprob bits, rank, k top ids, k top logprob bits]`` (no wait for the device)."""
        lps = torch.cat([self.logprobs[:, None], self.top_logprobs], dim=1).float()
        bits = lps.view(torch.int32).to(torch.int64)
        k = self.num_top
        return torch.cat([self.token_ids[:, None], bits[:, :1], self.ranks[:, None],
                          self.top_ids, bits[:, 1:1 + k]], dim=1).flatten()

    def to_list(self, num_top: list[int]) -> list[TokenLogprob]:
        """One :class:`TokenLogprob` per row, row ``i`` keeping its first ``num_top[i]``
        alternatives (one device-to-host copy)."""
        return unpack_logprobs(self.pack().tolist(), self.num_top, num_top)


def unpack_logprobs(values: list[int], k: int, num_top: list[int]) -> list[TokenLogprob]:
    """:meth:`LogprobTensors.pack`'s values, on the host, back to one :class:`TokenLogprob` per
    row (row ``i`` keeping its first ``num_top[i] <= k`` alternatives)."""
    width = 3 + 2 * k
    if len(values) != width * len(num_top):
        raise ValueError(f"{len(values)} packed values do not hold {len(num_top)} rows of "
                         f"{k} alternatives")
    if not num_top:
        return []
    table = np.asarray(values, dtype=np.int64).reshape(len(num_top), width)
    lp = table[:, 1].astype(np.int32).view(np.float32).tolist()
    top_lp = table[:, 3 + k:].astype(np.int32).view(np.float32).tolist()
    ints = table[:, : 3 + k].tolist()
    return [TokenLogprob(row[0], lp[i], row[2], tuple(zip(row[3:3 + n], top_lp[i][:n], strict=True)))
            for i, (row, n) in enumerate(zip(ints, num_top, strict=True))]


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobTensors:
    """For each row of ``logprobs`` [R, V] (log-softmaxed): the logprob and rank of
    ``token_ids[r]`` and the ``k`` largest entries (one ``topk``)."""
    ids = token_ids.to(logprobs.device, torch.int64)
    chosen = logprobs.gather(1, ids[:, None])
    ranks = (logprobs > chosen).sum(-1) + 1
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return LogprobTensors(ids, chosen[:, 0], ranks, top.indices, top.values)


def torch_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobTensors:
    """:func:`gather_logprobs` of ``log_softmax(logits)`` ([R, V] raw logits): the reference
    :data:`LogprobsOp` and ``Platform.logprobs``'s default. The alternatives come largest first;
    the order of equal values is ``torch.topk``'s, which is unspecified."""
    return gather_logprobs(logits.float().log_softmax(-1), token_ids, k)


#: ``op(logits [R, V], token_ids [R], k) -> LogprobTensors``: the logprob and rank of
#: ``token_ids[r]`` under ``log_softmax(logits[r])`` and the ``min(k, V)`` largest logprobs of
#: each row (float32 values), with no wait for the device.
LogprobsOp = Callable[[torch.Tensor, torch.Tensor, int], LogprobTensors]
