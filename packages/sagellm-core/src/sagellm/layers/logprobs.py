"""Log probabilities of chosen tokens, their rank and the top alternatives, batched on the device.

Which distribution: the model's own, ``log_softmax`` of the logits as the model produced them,
before the min-tokens ban, a structured-output mask, penalties, logit bias, temperature and
top-k/top-p/min-p. So the logprobs of a sequence sum to its log-likelihood under the model
whatever the sampling settings, and they match what vLLM reports by default; a token the
sampler could not have chosen (masked out) still gets its model logprob.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def to_list(self, num_top: list[int]) -> list[TokenLogprob]:
        """One :class:`TokenLogprob` per row, row ``i`` keeping its first ``num_top[i]``
        alternatives (one device-to-host copy per tensor)."""
        ids, lps, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return [TokenLogprob(t, lp, r, tuple(zip(ti[:k], tl[:k], strict=True)))
                for t, lp, r, ti, tl, k in zip(ids, lps, ranks, top_ids, top_lps, num_top, strict=True)]


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> LogprobTensors:
    """For each row of ``logprobs`` [R, V] (log-softmaxed): the logprob and rank of
    ``token_ids[r]`` and the ``k`` largest entries (one ``topk``)."""
    ids = token_ids.to(logprobs.device, torch.int64)
    chosen = logprobs.gather(1, ids[:, None])
    ranks = (logprobs > chosen).sum(-1) + 1
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return LogprobTensors(ids, chosen[:, 0], ranks, top.indices, top.values)
