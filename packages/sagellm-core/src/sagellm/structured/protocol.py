"""The per-request token constraint the sampler consults, whatever builds it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


@runtime_checkable
class TokenConstraint(Protocol):
    """Which tokens a request may emit next; advanced by each token it does emit.

    The model runner calls, for a constrained request in each decode step:
    ``fill_bitmask`` before sampling, ``accept_token`` with the sampled token, then
    ``is_terminated`` to learn whether the request should finish. End-of-sequence tokens are
    allowed exactly when the constraint may end; once it is terminated only they are allowed.
    """

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]``.

        ``bitmask`` is an int32 CPU tensor ``[rows, ceil(vocab / 32)]``; bit ``j`` of word
        ``w`` set means token ``32 * w + j`` is allowed. Other rows are left untouched.
        """
        ...

    def accept_token(self, token_id: int) -> bool:
        """Advance past ``token_id``; ``False`` when the token is not allowed (the constraint
        is then terminated and the request should finish with an error)."""
        ...

    def is_terminated(self) -> bool:
        """Whether the constraint is complete (or broken): the request should finish."""
        ...
