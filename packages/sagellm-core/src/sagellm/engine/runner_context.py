"""What a model runner is built from: the one argument of ``Platform.make_model_runner``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sagellm.config import EngineConfig
from sagellm.protocols import AttentionBackend, KVBackend, Platform


@dataclass(frozen=True)
class RunnerContext:
    """The parts of an engine a model runner works with, built once by the engine.

    A frozen dataclass rather than keyword arguments, so that a later contract version can add
    a field without breaking a backend that reads only the ones it knows.
    """

    #: The loaded model, after the layer swap and ``Platform.prepare_model``. Called as
    #: ``model(input_ids, positions, ForwardContext)``; ``model.compute_logits(hidden)`` gives
    #: logits; ``model.config`` is the Hugging Face config.
    model: nn.Module
    #: The paged KV pool the forward writes to and reads from.
    kv: KVBackend
    #: The attention kernels every attention layer calls.
    attention: AttentionBackend
    #: The platform that built ``kv`` and ``attention``; host/device transfers go through it.
    platform: Platform
    #: The engine's settings (``max_num_seqs``, ``max_num_batched_tokens``, ``enforce_eager`` ...).
    config: EngineConfig
    #: Tokens per KV block (``config.block_size``).
    block_size: int
    #: The longest sequence the engine admits (``config.max_model_len`` or the model's).
    max_model_len: int

    @property
    def device(self) -> torch.device:
        return self.platform.device
