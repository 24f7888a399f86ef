"""Structured output: constrain a request's tokens to a JSON schema, regex, grammar or choice.

One concept per module: ``params`` (what a request asks for, bounded), ``protocol`` (the
``TokenConstraint`` the sampler drives), ``tokenizer`` (the grammar engine's view of the model's
tokenizer), ``compiler`` (params -> cached grammar, off the step loop), ``constraint`` (one
request's state), ``bitmask`` (masks applied to logits on their device), ``factory`` (the
engine's entry point) and ``tools`` (grammars that force a tool call). The grammar engine is
llguidance; only ``params`` and ``protocol`` import without it, so ``sampling_params`` stays
light.
"""

from __future__ import annotations

from sagellm.structured.params import StructuredOutputParams
from sagellm.structured.protocol import TokenConstraint

__all__ = ["StructuredOutputParams", "TokenConstraint"]
