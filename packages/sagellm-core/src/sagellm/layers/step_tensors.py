"""Small per-step host values (row indices, per-row settings, token ids) moved to the device
without waiting for it.

``torch.tensor(values, device="cuda")`` copies from pageable memory and then waits for the
stream, that is, for the whole forward queued before it; a step that makes a few of them
(penalties, logit bias, logprobs, a constraint's rows) pays the forward's latency on the host
and serialises all later host work with the device. Built here instead, the values go through
page-locked memory (torch's caching host allocator, which keeps a buffer until its copy has
run) and a non-blocking copy, so the step's only wait stays ``Platform.fetch_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def step_tensor(values: Sequence[int] | Sequence[float], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """``values`` as a 1-D ``dtype`` tensor on ``device``; never waits for the device."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


class RepeatedStepTensor:
    """A :func:`step_tensor` whose values mostly repeat from one step to the next (the per-row
    settings of a batch that keeps its rows): copied to the device again only when they change.
    The tensor handed out is never written, so a later step may read it again."""

    def __init__(self) -> None:
        self._values: list[int] | list[float] | None = None
        self._tensor: torch.Tensor | None = None

    def get(self, values: list[int] | list[float], dtype: torch.dtype, device: torch.device
            ) -> torch.Tensor:
        """``step_tensor(values, dtype, device)``, or the same tensor as last time if nothing
        differs (``values``, compared by ``==``, ``dtype`` and ``device``)."""
        t = self._tensor
        if t is None or t.dtype != dtype or t.device != device or values != self._values:
            t = self._tensor = step_tensor(values, dtype, device)
            self._values = list(values)
        return t


def row_index(rows: list[int], num_rows: int, device: torch.device) -> torch.Tensor | None:
    """``rows`` (ascending) as a device index, or ``None`` when they are all ``num_rows`` rows
    (the caller then works on the whole batch, with no gather and no scatter)."""
    if len(rows) == num_rows:
        return None
    return step_tensor(rows, torch.int64, device)
