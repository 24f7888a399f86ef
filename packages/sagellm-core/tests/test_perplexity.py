"""Perplexity of the embedded SmolLM2 with real weights, per weight format, on a fixed text.

The text (``data/declaration_of_independence.txt``) is the opening of the US Declaration of
Independence (1776; public domain), after the National Archives transcription, dashes dropped.
The reference is float32 with the weights as loaded (the GGUF's Q4_1 dequantized), so int4
repacks those very codes and differs by bfloat16 activations and the int8 head only; int8 is a
real requantization (per output row, of the dequantized floats).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm import LLM, SamplingParams
from sagellm.layers.quant_linear import QuantizedMatmul
from sagellm.testing.perplexity import perplexity


@pytest.fixture(scope="module")
def text_ids(perplexity_ids: list[int]) -> list[int]:
    return perplexity_ids


@pytest.fixture(scope="module")
def ref_ppl(reference_perplexity: float) -> float:
    return reference_perplexity


def test_reference_perplexity_is_sane(ref_ppl: float, text_ids: list[int]) -> None:
    # A 135M model on 18th-century prose: well under the vocabulary, well above 1.
    assert len(text_ids) > 500
    assert 5 < ref_ppl < 60


def test_int8_within_2_percent(ref_ppl: float, text_ids: list[int]) -> None:
    ppl = perplexity(LLM(model=None, quantization="int8").engine, text_ids)
    assert abs(ppl / ref_ppl - 1) < 0.02, (ppl, ref_ppl)


@pytest.fixture(scope="module")
def auto_llm(smollm2_dir: Path) -> LLM:
    """``quantization=auto``: int4 from the stored Q4_1 blocks on a CPU with fast bfloat16."""
    return LLM(model=None, quantization="auto")


def test_int4_within_10_percent(auto_llm: LLM, ref_ppl: float, text_ids: list[int]) -> None:
    # auto is int4 on a CPU with fast bfloat16, float32 elsewhere; both must pass.
    ppl = perplexity(auto_llm.engine, text_ids)
    assert abs(ppl / ref_ppl - 1) < 0.10, (ppl, ref_ppl)


def test_auto_runs_int4_from_the_stored_blocks(auto_llm: LLM) -> None:
    from sagellm.quant.cpu_features import has_fast_bf16

    if not has_fast_bf16():
        pytest.skip("auto keeps float32 weights on a CPU without fast bfloat16")
    mods = [m for m in auto_llm.engine.model.modules() if isinstance(m, QuantizedMatmul)]
    assert len(mods) == 30 * 4 + 1
    assert {m.qweight.scheme for m in mods} == {"int4", "int8"}  # the head is int8
    heads = [m for m in mods if m.qweight.scheme == "int8"]
    assert len(heads) == 1 and heads[0].qweight.refine is not None  # float32 top logits


def test_auto_answers_the_capital_of_france(auto_llm: LLM) -> None:
    # The first answer token leads by 0.08 nats in float32: with bfloat16 logits from the int8
    # head, int4 tied "The" with "L" and answered "L'Étoile, la Marseillaise...".
    out = auto_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.text, out.text
