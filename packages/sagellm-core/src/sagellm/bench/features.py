"""The per-request OpenAI features whose cost per decode step is measured, one place for both
benchmarks that measure it: ``packages/sagellm-cuda/benchmarks/step_cost.py`` (wall and device
time on a GPU) and ``packages/sagellm-core/benchmarks/host_step.py --features`` (host time)."""

from __future__ import annotations

#: A small JSON schema (the ``json_schema`` row).
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def feature_variants() -> dict[str, dict[str, object]]:
    """``SamplingParams`` keyword arguments per variant, on top of greedy with ``ignore_eos``."""
    from sagellm.structured.params import StructuredOutputParams

    return {
        "plain": {},
        "json_schema": {"structured_output": StructuredOutputParams(json_schema=SCHEMA)},
        "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1},
        "logprobs5": {"logprobs": 5},
    }
