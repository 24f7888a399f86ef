"""Model registry: HF ``architectures`` names to our classes."""

from __future__ import annotations

from torch import nn

from sagellm.models.llama import LlamaForCausalLM
from sagellm.models.mixtral import MixtralForCausalLM
from sagellm.models.qwen2 import Qwen2ForCausalLM
from sagellm.models.qwen3 import Qwen3ForCausalLM
from sagellm.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
               "qwen3_moe": "Qwen3MoeForCausalLM"}


def resolve_model_class(config) -> type[nn.Module]:  # type: ignore[no-untyped-def]
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "model_type", None) in MODEL_TYPES:
        archs.append(MODEL_TYPES[config.model_type])
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(f"model architecture {archs or config.model_type!r} is not supported; "
                     f"supported: {', '.join(sorted(MODEL_REGISTRY))}")
