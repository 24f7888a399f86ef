"""Checkpoint loading for mixture-of-experts families: expert tensors into stacked parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sagellm.layers.moe import MoEExperts, expert_target


class MoEWeightLoading:
    """Mixed into a family's model class ahead of :class:`~sagellm.models.llama.LlamaForCausalLM`:
    sends every expert tensor (``experts.3.w1.weight``, ``experts.gate_up_proj``, ...) to its
    slice of the layer's stacked ``w13``/``w2``, and refuses a checkpoint that leaves a slice
    unfilled (the dense loader only sees parameter names, and one expert fills part of one)."""

    #: Checkpoint name fragments renamed first (Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``).
    renames: dict[str, str] = {}

    def checkpoint_parts(self, name: str, tensor: torch.Tensor
                         ) -> Iterable[tuple[str, torch.Tensor, object]]:
        for old, new in self.renames.items():
            name = name.replace(old, new)
        target = expert_target(name)
        if target is not None:
            return [(target[0], tensor, target[1])]
        return super().checkpoint_parts(name, tensor)  # type: ignore[misc,no-any-return]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        assert isinstance(self, nn.Module)
        loaded: set[str] = super().load_weights(weights)  # type: ignore[misc]
        for mname, module in self.named_modules():
            # A layer with no expert tensor at all shows in the loader's missing-name check.
            touched = {f"{mname}.w13", f"{mname}.w2"} & loaded
            if isinstance(module, MoEExperts) and touched:
                missing = module.missing_weights()
                if missing:
                    raise ValueError(f"checkpoint lacks {len(missing)} expert tensors of {mname}, "
                                     f"e.g. {missing[:3]}")
        return loaded
