"""Linears whose weight is stored quantized: the weight object and the swap that installs it.

A backend provides each scheme it runs as a :class:`QuantizedWeight` subclass (packing plus one
kernel call) through ``Platform.register_quantizations``. :func:`quantize_linear` gives a loaded
linear such a weight: the module drops its float ``weight``, keeps the packed one as
``qweight`` and changes class to a subclass of its own class whose ``matmul`` calls
``qweight.matmul``. Everything else of the linear (sharding, the all-reduce, the bias) is the
core class's code, unchanged.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import nn

from sagellm.layers.linear import ColumnParallelLinear, ParallelLMHead, RowParallelLinear

#: The core classes whose matrix product goes through ``matmul`` (subclasses included).
QUANTIZABLE = (ColumnParallelLinear, RowParallelLinear, ParallelLMHead)


class QuantizedWeight(abc.ABC):
    """One linear's weight ``[out, in]`` in a backend's packed format."""

    #: The ``EngineConfig.quantization`` value that selects this format.
    scheme: ClassVar[str]
    #: The scheme of the LM head when this one is selected (``None``: this one), for formats
    #: too coarse for the logits; used where the backend registers it. ``"none"``: the head
    #: keeps its loaded weight.
    head_scheme: ClassVar[str | None] = None

    @classmethod
    @abc.abstractmethod
    def from_float(cls, weight: torch.Tensor) -> QuantizedWeight:
        """Quantize a float weight ``[out, in]`` (round to nearest on this format's grid)."""

    @classmethod
    def from_grid(cls, grid: Any) -> QuantizedWeight | None:
        """Pack an already-quantized weight (a :mod:`sagellm.quant.grids` grid read from the
        checkpoint) without requantizing; ``None`` when ``grid`` is not on this format's grid."""
        return None

    @abc.abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x [tokens, in] @ W^T`` -> ``[tokens, out]`` in ``x``'s dtype."""

    @abc.abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[out, in]`` this packed form stands for (tests, references)."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held by the packed weight and its scales."""

    @classmethod
    def supports(cls, out_features: int, in_features: int) -> bool:
        """Whether a ``[out, in]`` weight fits this format (group sizes, alignment)."""
        return True

    def as_lm_head(self) -> None:
        """Called once when this weight is the LM head's (its outputs are logits), for formats
        that compute logits more carefully than other products; nothing by default."""

    @classmethod
    def runs_fast(cls) -> bool:
        """Whether this machine runs the format faster than float weights, so that
        ``quantization=auto`` may pick it for a checkpoint stored in it."""
        return True


class QuantizedMatmul:
    """Mixed into a quantizable linear's class by :func:`quantize_linear`."""

    qweight: QuantizedWeight

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.qweight.matmul(x)
        return y if bias is None else y + bias


_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def quantized_class(base: type[nn.Module]) -> type[nn.Module]:
    """The quantized variant of ``base`` (made once per class)."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"Quantized{base.__name__}", (QuantizedMatmul, base), {"__module__": __name__})
        _CLASSES[base] = cls
    return cls


def quantize_linear(module: nn.Module, qweight: QuantizedWeight) -> None:
    """Install ``qweight`` in ``module`` (a :data:`QUANTIZABLE` linear), in place.

    The float weight is dropped from the module; a tied head's weight stays with the embedding
    that owns it.
    """
    if not isinstance(module, QUANTIZABLE) or isinstance(module, QuantizedMatmul):
        raise TypeError(f"{type(module).__qualname__} is not an unquantized sageLLM linear")
    del module.weight
    module.qweight = qweight  # type: ignore[assignment]
    module.__class__ = quantized_class(type(module))
