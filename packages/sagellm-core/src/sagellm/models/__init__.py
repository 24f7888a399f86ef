"""Model registry: HF ``architectures`` names to our classes, one module per family."""

from __future__ import annotations

from torch import nn

from sagellm.models.gemma2 import Gemma2ForCausalLM
from sagellm.models.gemma3 import Gemma3ForCausalLM
from sagellm.models.llama import LlamaForCausalLM
from sagellm.models.mistral import MistralForCausalLM
from sagellm.models.mixtral import MixtralForCausalLM
from sagellm.models.phi3 import Phi3ForCausalLM
from sagellm.models.qwen2 import Qwen2ForCausalLM
from sagellm.models.qwen3 import Qwen3ForCausalLM
from sagellm.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
}
#: HF ``model_type`` -> architecture, for configs without ``architectures``.
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
               "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
               "phi3": "Phi3ForCausalLM", "mixtral": "MixtralForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM"}


def model_types_of(arch: str) -> list[str]:
    """The HF ``model_type`` names that resolve to ``arch``."""
    return [t for t, a in MODEL_TYPES.items() if a == arch]


def resolve_model_class(config) -> type[nn.Module]:  # type: ignore[no-untyped-def]
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "model_type", None) in MODEL_TYPES:
        archs.append(MODEL_TYPES[config.model_type])
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"model architecture {archs or config.model_type!r} is not supported; "
                     f"supported: {', '.join(sorted(MODEL_REGISTRY))}")
