"""The model-runner half of the backend contract, in one public module.

A backend that wants more than kernels (CUDA graphs, say) subclasses :class:`ModelRunner` and
returns it from ``Platform.make_model_runner(ctx)``; everything such a runner needs is here:

* :class:`RunnerContext` - what the runner is built from;
* :class:`ModelRunner` - core's runner and its hooks: ``prepare`` (plan -> :class:`ModelInput`),
  ``forward_context``, ``forward``, ``compute_logits``, ``sample`` (with
  ``suppress_early_stop``, structured-output masks, penalties, logit bias and logprobs; its
  non-waiting half ``sample_tokens`` with ``fetch_sampled``, which brings ids and logprobs back in
  one copy), ``fetch_ids``, and ``launch``, which the engine calls (``execute`` is ``launch``
  and its wait: a runner that overrides only ``execute`` runs every step synchronously). A
  runner that picks tokens
  without ``sample`` (an argmax inside a CUDA graph) may do so only where
  ``argmax_suffices(seqs)`` holds, or ``argmax_is_token(seqs)`` with the rows' logprobs from
  ``argmax_logprobs``, and must leave prefills of sequences whose
  ``needs_prompt_logits`` is true to core's path (their logits are needed at every position);
* :class:`StepPlan`, :class:`PrefillOp`, :class:`DecodeOp` - the step the scheduler planned;
* :class:`StepLaunch` - a queued step whose ids are on their way to the host (``fetch_later``
  makes one); with asynchronous scheduling the next step's inputs may hold
  :data:`PENDING_TOKEN`, which :func:`patch_pending` replaces on the device from the previous
  launch's ids (``prepare`` does it; a runner staging its own inputs calls it);
* :class:`SampledLogprobs` - a step's sampled-token logprobs still on the device;
* :class:`MaskFill` - a step's structured-output masks, begun by ``begin_mask_fill`` before
  the forward and handed to ``sample_tokens`` (``apply_token_bitmask`` applies them);
* :class:`SequenceState` - one request as the plan refers to it (tokens, block table, params);
* :class:`ForwardContext` - what the model's attention layers receive.

These names are covered by ``sagellm.protocols.CONTRACT_VERSION``; anything else under
``sagellm.engine`` may change without notice.
"""

from __future__ import annotations

from sagellm.engine.mask_fill import MaskFill
from sagellm.engine.model_runner import ModelInput, ModelRunner, StepRunner
from sagellm.engine.plan import DecodeOp, PrefillOp, StepPlan
from sagellm.engine.request_logits import SampledLogprobs
from sagellm.engine.runner_context import RunnerContext
from sagellm.engine.sequence import SequenceState
from sagellm.engine.step_launch import PENDING_TOKEN, StepLaunch, patch_pending, pending_rows
from sagellm.layers.attention import ForwardContext

__all__ = [
    "PENDING_TOKEN",
    "DecodeOp",
    "ForwardContext",
    "MaskFill",
    "ModelInput",
    "ModelRunner",
    "PrefillOp",
    "RunnerContext",
    "SampledLogprobs",
    "SequenceState",
    "StepLaunch",
    "StepPlan",
    "StepRunner",
    "patch_pending",
    "pending_rows",
]
