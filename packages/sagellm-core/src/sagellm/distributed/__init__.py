"""Several processes behind one engine: tensor parallelism and prefill/decode disaggregation.

* :mod:`~sagellm.distributed.launcher` starts, watches and stops the other ranks (or joins them
  under ``torchrun``);
* :mod:`~sagellm.distributed.wire` turns a step's inputs into tensors for ``CommBackend.broadcast``;
* :mod:`~sagellm.distributed.tp_worker` runs tensor-parallel steps on every rank;
* :mod:`~sagellm.distributed.disagg` splits prefill and decode between two workers and moves the
  finished prompts' KV blocks with ``CommBackend.send_kv_blocks`` / ``recv_kv_blocks``.

``LLMEngine`` enters here when ``tensor_parallel_size > 1`` or ``disaggregate_prefill`` is set; a
single-rank engine never imports this package.
"""

from __future__ import annotations

from sagellm.distributed.launcher import WorkerFailure, WorkerGroup, launch

__all__ = ["WorkerFailure", "WorkerGroup", "launch"]
