"""The layers a backend may replace, and the swap that puts its replacements into a model.

A backend offers replacements through ``Platform.register_layers(register)``; core checks each
against the declaration here and, once per engine rank after the weights load, changes the class
of every module whose type is exactly the core class (a model's own subclass keeps its code).
Parameters and buffers stay where they are, so a replacement overrides ``forward`` only and reads
only the attributes its kind declares in :attr:`SwappableLayer.attributes`: those are the state
core promises to keep, under those names, within one ``CONTRACT_VERSION``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import nn

from sagellm.layers.activation import SiluAndMul
from sagellm.layers.moe import MoEExperts
from sagellm.layers.norm import RMSNorm
from sagellm.layers.quant_linear import QuantizedWeight
from sagellm.layers.rotary import RotaryEmbedding
from sagellm.protocols import Platform


class LayerKind(enum.Enum):
    RMS_NORM = "rms_norm"
    SILU_AND_MUL = "silu_and_mul"
    ROTARY_EMBEDDING = "rotary_embedding"
    MOE_EXPERTS = "moe_experts"


@dataclass(frozen=True)
class SwappableLayer:
    """One swappable layer: core's class, its ``forward`` contract and the state it exposes."""

    kind: LayerKind
    base: type[nn.Module]
    #: Attributes a replacement may read (set by ``base.__init__``, never renamed silently).
    attributes: tuple[str, ...]
    #: What ``forward`` takes and returns; a replacement keeps exactly this.
    forward: str


SWAPPABLE_LAYERS: dict[LayerKind, SwappableLayer] = {
    spec.kind: spec for spec in (
        SwappableLayer(LayerKind.RMS_NORM, RMSNorm, ("weight", "eps"),
                       "forward(x, residual=None): norm(x) * weight, or with a residual the pair "
                       "(norm(x + residual) * weight, x + residual)"),
        SwappableLayer(LayerKind.SILU_AND_MUL, SiluAndMul, (),
                       "forward(x [..., 2n]) -> silu(x[..., :n]) * x[..., n:]"),
        SwappableLayer(LayerKind.ROTARY_EMBEDDING, RotaryEmbedding, ("cos_sin", "half"),
                       "forward(positions [T], q [T, H, D], k [T, Hkv, D]) -> (q, k) rotated in "
                       "the rotate-half layout with cos_sin [max_position, D] = [cos | sin]; "
                       "may rotate q and k in place"),
        SwappableLayer(LayerKind.MOE_EXPERTS, MoEExperts,
                       ("w13", "w2", "num_experts", "top_k", "renormalize"),
                       "forward(x [T, H], router_logits [T, E]) -> [T, H] in x's dtype: "
                       "sum over each token's top_k experts (softmax over router_logits, "
                       "renormalised over the chosen when renormalize) of weight * "
                       "(silu(x w13[e, :I]^T) * (x w13[e, I:]^T)) w2[e]^T, with "
                       "w13 [E, 2I, H] and w2 [E, H, I] this rank's slice (not all-reduced); "
                       "sagellm.layers.moe.select_experts is the routing to match"),
    )
}


def check_replacement(kind: LayerKind, replacement: type[nn.Module]) -> SwappableLayer:
    """The declaration of ``kind``, after checking that ``replacement`` may stand in for it.

    Raises ``TypeError`` when ``replacement`` does not subclass the core class or has state of
    its own (an ``__init__`` of its own would never run: the swap changes the class only).
    """
    spec = SWAPPABLE_LAYERS.get(kind) if isinstance(kind, LayerKind) else None
    if spec is None:
        names = ", ".join(k.name for k in LayerKind)
        raise TypeError(f"{kind!r} is not a swappable layer kind (LayerKind: {names})")
    if not (isinstance(replacement, type) and issubclass(replacement, spec.base)):
        raise TypeError(f"the replacement for {kind.name} must subclass "
                        f"{spec.base.__module__}.{spec.base.__qualname__}, got {replacement!r}")
    if replacement.__init__ is not spec.base.__init__:
        raise TypeError(f"{replacement.__qualname__} defines __init__; a layer replacement "
                        f"overrides forward only (its __init__ would never run)")
    return spec


def layer_overrides(platform: Platform) -> dict[type[nn.Module], type[nn.Module]]:
    """The replacements ``platform`` registers, by the core class they replace, checked."""
    found: dict[type[nn.Module], type[nn.Module]] = {}

    def register(kind: LayerKind, replacement: type[nn.Module]) -> None:
        spec = check_replacement(kind, replacement)
        if spec.base in found:
            raise ValueError(f"{type(platform).__name__} registered two replacements for "
                             f"{kind.name}: {found[spec.base].__qualname__} and "
                             f"{replacement.__qualname__}")
        found[spec.base] = replacement

    platform.register_layers(register)
    return found


def swap_layers(model: nn.Module, overrides: dict[type[nn.Module], type[nn.Module]]) -> int:
    """Give every module of ``model`` whose type is exactly a key of ``overrides`` the
    replacement class, in place; returns how many modules changed."""
    n = 0
    for module in model.modules():
        replacement = overrides.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
            n += 1
    return n


def weight_quantizations(platform: Platform) -> dict[str, type[QuantizedWeight]]:
    """The quantized weight formats ``platform`` registers, by scheme name, checked."""
    found: dict[str, type[QuantizedWeight]] = {}

    def register(weight_cls: type[QuantizedWeight]) -> None:
        if not (isinstance(weight_cls, type) and issubclass(weight_cls, QuantizedWeight)):
            raise TypeError(f"a quantization must subclass sagellm.layers.quant_linear."
                            f"QuantizedWeight, got {weight_cls!r}")
        scheme = getattr(weight_cls, "scheme", None)
        if not isinstance(scheme, str) or scheme in ("auto", "none"):
            raise TypeError(f"{weight_cls.__qualname__}.scheme must name a scheme, got {scheme!r}")
        if scheme in found:
            raise ValueError(f"{type(platform).__name__} registered two {scheme} quantizations: "
                             f"{found[scheme].__qualname__} and {weight_cls.__qualname__}")
        found[scheme] = weight_cls

    platform.register_quantizations(register)
    return found
