"""sagellm-mlu: Cambricon MLU backend for sageLLM (torch_mlu, CNCL)."""

from __future__ import annotations

__version__ = "0.1.0"
