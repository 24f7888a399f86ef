"""Test doubles a backend author can use in their own tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sagellm.protocols import (
    FULL_ATTENTION,
    AttentionBackend,
    AttentionLayerSpec,
    DecodeMetadata,
    PrefillMetadata,
)


@dataclass
class AttentionCall:
    kind: str  # "write_kv", "prefill" or "decode"
    num_tokens: int
    has_prefix: bool = False
    layer: AttentionLayerSpec = FULL_ATTENTION


class RecordingAttentionBackend(AttentionBackend):
    """Delegates to ``inner`` and records every call, e.g. to check that a custom model runner
    reaches the backend, or that the metadata a platform builds has the expected shape."""

    name = "recording"

    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.calls: list[AttentionCall] = []

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.calls.append(AttentionCall("write_kv", key.shape[0]))
        self.inner.write_kv(key, value, key_cache, value_cache, slot_mapping)

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_cache: torch.Tensor, value_cache: torch.Tensor, meta: PrefillMetadata,
                scale: float, layer: AttentionLayerSpec = FULL_ATTENTION) -> torch.Tensor:
        self.calls.append(AttentionCall("prefill", query.shape[0], meta.has_prefix, layer))
        extra = {} if layer.is_full else {"layer": layer}
        return self.inner.prefill(query, key, value, key_cache, value_cache, meta, scale, **extra)

    def decode(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               meta: DecodeMetadata, scale: float, layer: AttentionLayerSpec = FULL_ATTENTION
               ) -> torch.Tensor:
        self.calls.append(AttentionCall("decode", query.shape[0], layer=layer))
        extra = {} if layer.is_full else {"layer": layer}
        return self.inner.decode(query, key_cache, value_cache, meta, scale, **extra)

    def kinds(self) -> list[str]:
        return [c.kind for c in self.calls]
