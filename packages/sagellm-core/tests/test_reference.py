"""Greedy output equals transformers' greedy output, token for token (fp32, same weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm import LLM, SamplingParams

SMOL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
]


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.append(out[0, len(p):].tolist())
    return outs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_random_models_match_transformers(prompts, arch: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    prompts = prompts(6, 320, seed=7)
    expected = hf_greedy(model_dir, prompts, 24)
    llm = LLM(model=str(model_dir))
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)
    assert [o.token_ids for o in outs] == expected


def test_smollm2_matches_transformers(smol_llm: LLM, smollm2_dir: Path) -> None:
    tok = smol_llm.tokenizer
    prompts = [smol_llm.apply_chat_template([{"role": "user", "content": p}]) for p in SMOL_PROMPTS]
    expected = hf_greedy(smollm2_dir, prompts, 32)
    outs = smol_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
                             use_tqdm=False)
    for out, exp in zip(outs, expected):
        assert out.token_ids == exp, (tok.decode(out.token_ids), tok.decode(exp))


def test_smollm2_answers_capital_of_france(smol_llm: LLM) -> None:
    out = smol_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # stopped at <|im_end|>, not by length
