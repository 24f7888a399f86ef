"""Several processes behind one engine: tensor parallelism and prefill/decode disaggregation.

* :mod:`~sagellm.distributed.launcher` starts, watches and stops the other ranks (or joins them
  under ``torchrun``);
* :mod:`~sagellm.distributed.topology` finds which ranks share a host (never assumed);
* :mod:`~sagellm.distributed.wire` turns a step's inputs into tensors for ``CommBackend.broadcast``;
* :mod:`~sagellm.distributed.tp_worker` runs tensor-parallel steps on every rank;
* :mod:`~sagellm.distributed.disagg` splits prefill and decode between two workers and moves the
  finished prompts' KV blocks with ``CommBackend.send_kv_blocks`` / ``recv_kv_blocks``.

The engine's builder enters here, through :func:`launch_layout`, when ``tensor_parallel_size > 1``
or ``disaggregate_prefill`` is set; a single-rank engine never imports this package. The engine
does not import it either (this package builds on ``sagellm.engine``): the builder looks it up
by name (``sagellm.engine.builder.MULTI_RANK_LAYOUTS``).
"""

from __future__ import annotations

from sagellm.config import EngineConfig
from sagellm.distributed.disagg import DisaggLayout
from sagellm.distributed.launcher import WorkerFailure, WorkerGroup, launch
from sagellm.distributed.tp_worker import TensorParallelLayout
from sagellm.engine.layout import Layout
from sagellm.protocols import Platform

__all__ = ["WorkerFailure", "WorkerGroup", "launch", "launch_layout"]


def launch_layout(config: EngineConfig, platform: Platform) -> Layout:
    """Start (or join) the other ranks ``config`` asks for; returns rank 0's layout."""
    workers = launch(config, platform)
    if workers.role == "tensor-parallel":
        return TensorParallelLayout(workers)
    return DisaggLayout(workers)
