"""Structured output: constrain a request's tokens to a JSON schema, regex, grammar or choice.

One concept per module: ``params`` (what a request asks for, bounded), ``protocol`` (the
``TokenConstraint`` the sampler drives), ``tokenizer`` (the grammar engine's view of the model's
tokenizer), ``compiler`` (params -> cached grammar, off the step loop), ``constraint`` (one
request's state), ``bitmask`` (masks applied to logits on their device), ``factory`` (the
engine's entry point) and ``tools`` (grammars that force a tool call). The grammar engine is
llguidance; only ``params`` imports without it (and without torch), so ``sampling_params``
stays light: the other names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sagellm.structured.params import StructuredOutputParams

__all__ = ["StructuredOutputParams", "TokenConstraint", "auto_tool_call_grammar",
           "tool_call_grammar"]

if TYPE_CHECKING:
    from sagellm.structured.protocol import TokenConstraint
    from sagellm.structured.tools import auto_tool_call_grammar, tool_call_grammar


def __getattr__(name: str) -> object:
    if name == "TokenConstraint":
        from sagellm.structured.protocol import TokenConstraint

        return TokenConstraint
    if name in ("tool_call_grammar", "auto_tool_call_grammar"):
        from sagellm.structured import tools

        return getattr(tools, name)
    raise AttributeError(f"module 'sagellm.structured' has no attribute {name!r}")
