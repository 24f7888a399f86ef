"""An example sageLLM backend: runs on the CPU with its own attention kernels in plain torch."""

from __future__ import annotations

__version__ = "0.1.0"
