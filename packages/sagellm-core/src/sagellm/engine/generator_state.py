"""The random state of seeded requests, saved before a step and rewound after one that raised,
so that the step run again draws the same numbers."""

from __future__ import annotations

import torch

from sagellm.engine.sequence import SequenceState

GeneratorState = tuple[SequenceState, "torch.Generator | None", "torch.Tensor | None"]


def save_generators(seqs: list[SequenceState]) -> list[GeneratorState]:
    """The random state of the seeded sequences among ``seqs``."""
    saved: list[GeneratorState] = []
    for s in seqs:
        if s.params.seed is not None:
            g = s.generator
            saved.append((s, g, g.get_state() if g is not None else None))
    return saved


def restore_generators(saved: list[GeneratorState]) -> None:
    """Put back what :func:`save_generators` saved."""
    for seq, g, state in saved:
        seq.generator = g
        if g is not None and state is not None:
            g.set_state(state)
