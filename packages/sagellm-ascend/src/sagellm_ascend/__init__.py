"""sagellm-ascend: Huawei Ascend NPU backend for sageLLM (torch_npu, HCCL)."""

from __future__ import annotations

__version__ = "0.1.0"
