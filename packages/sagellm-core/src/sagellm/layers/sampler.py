"""Batched token sampling on the device: greedy, temperature, top-k, top-p, min-p, per-request
seeds.

Sampling uses the exponential race (``argmax(p / E)`` with ``E ~ Exp(1)``), which draws from ``p``
without a cumulative sum; a request with a seed draws its ``E`` from its own generator, so its
tokens do not depend on what it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from sagellm.layers.step_tensors import step_tensor


@dataclass
class SamplingBatch:
    """Per-row settings, built by the model runner for the rows of one step that sample."""

    temperatures: list[float]
    top_ks: list[int]
    top_ps: list[float]
    generators: list[torch.Generator | None]
    #: ``None``: no row uses min-p.
    min_ps: list[float] | None = None

    @property
    def all_greedy(self) -> bool:
        return all(t == 0.0 for t in self.temperatures)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (``-inf``). ``top_k <= 0`` disables."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        ranks = torch.arange(vocab, device=logits.device)
        mask |= ranks[None, :] >= k[:, None]
    if top_p is not None:
        probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        mask |= before > top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below ``min_p`` times each row's largest (``min_p == 0``: none).

    Not renormalised: the exponential race samples proportionally to whatever mass is left.
    """
    floor = probs.amax(-1, keepdim=True) * min_p[:, None]
    return probs.masked_fill(probs < floor, 0.0)


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """``logits`` [N, V] -> token ids [N] (int64, on the logits' device)."""
        greedy_ids = logits.argmax(-1)
        if batch.all_greedy:
            return greedy_ids
        dev = logits.device
        temps = step_tensor(batch.temperatures, torch.float32, dev)
        greedy = temps == 0
        # Shift each row's maximum to 0 before dividing: a tiny temperature (1e-40, say) then
        # sends the other logits to -inf instead of overflowing them all to inf (inf - inf is
        # NaN in the softmax), so it tends to greedy as it should.
        x = logits.float()
        x = (x - x.amax(-1, keepdim=True)) / torch.where(greedy, 1.0, temps)[:, None]
        top_k = (step_tensor(batch.top_ks, torch.int64, dev)
                 if any(k > 0 for k in batch.top_ks) else None)
        top_p = (step_tensor(batch.top_ps, torch.float32, dev)
                 if any(p < 1.0 for p in batch.top_ps) else None)
        x = apply_top_k_top_p(x, top_k, top_p)
        probs = x.softmax(-1)
        if batch.min_ps is not None and any(p > 0.0 for p in batch.min_ps):
            min_p = step_tensor(batch.min_ps, torch.float32, dev)
            probs = apply_min_p(probs, min_p)
        noise = self._exponential(probs.shape, batch.generators, dev)
        sampled = (probs / noise).argmax(-1)
        return torch.where(greedy, greedy_ids, sampled)

    @staticmethod
    def _exponential(shape: torch.Size, generators: Seq[torch.Generator | None],
                     device: torch.device) -> torch.Tensor:
        noise = torch.empty(shape, device=device).exponential_()
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        return noise.clamp_min_(1e-20)
