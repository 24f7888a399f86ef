"""Checkpoint loading for mixture-of-experts families: expert tensors into stacked parameters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from sagellm.layers.moe import MoEExperts, expert_target


class MoEWeightLoading:
    """Mixed into a family's model class ahead of :class:`~sagellm.models.llama.LlamaForCausalLM`:
    routes every expert tensor (``experts.3.w1.weight``, ``experts.gate_up_proj``, ...) to its
    slice of the layer's stacked ``w13``/``w2`` and hands the rest to the dense loader."""

    #: Checkpoint name fragments renamed before anything else (``.block_sparse_moe.`` -> ``.mlp.``).
    renames: dict[str, str] = {}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        assert isinstance(self, nn.Module)
        params = dict(self.named_parameters())
        stacked: set[str] = set()

        def dense() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                for old, new in self.renames.items():
                    name = name.replace(old, new)
                target = expert_target(name.removeprefix("model."))
                if target is None:
                    yield name, tensor
                    continue
                pname, shard = target
                param = params.get(pname)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in "
                                     f"{type(self).__name__}")
                param.weight_loader(param, tensor.to(param.dtype), shard)  # type: ignore[attr-defined]
                stacked.add(pname)

        loaded: set[str] = super().load_weights(dense())  # type: ignore[misc]
        for mname, module in self.named_modules():
            # An untouched layer shows up in the loader's own missing-parameter check.
            touched = {f"{mname}.w13", f"{mname}.w2"} & stacked
            if isinstance(module, MoEExperts) and touched:
                missing = module.missing_weights()
                if missing:
                    raise ValueError(f"checkpoint lacks {len(missing)} expert tensors of {mname}, "
                                     f"e.g. {missing[:3]}")
        return loaded | stacked
