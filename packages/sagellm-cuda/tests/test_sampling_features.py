"""Logprobs, prompt logprobs, penalties, logit bias, n > 1 and a token constraint on the CUDA
backend: the graph runner agrees with eager steps, and logprobs agree with transformers (fp32).

Run on a GPU machine: ``pytest -m gpu packages/sagellm-cuda/tests/test_sampling_features.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sagellm.testing.structured import OnlyToken

pytestmark = pytest.mark.gpu

PROMPTS = {"greedy_lp": 5, "penalised": 17, "biased": 40, "seeded": 23, "prompt_lp": 150,
           "constrained": 9, "plain": 64}
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(1234)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         vocab_size=1000, max_position_embeddings=1024, rms_norm_eps=1e-6,
                         initializer_range=0.08, num_attention_heads=4, num_key_value_heads=4,
                         head_dim=64, tie_word_embeddings=False, rope_theta=1e4)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model.to("cuda").eval()


def _prompt(name: str) -> list[int]:
    g = torch.Generator().manual_seed(len(name))
    return torch.randint(3, 1000, (PROMPTS[name],), generator=g).tolist()


def _run(path: Path, **kw: object) -> tuple[dict, int]:  # type: ignore[type-arg]
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm.sampling_params import SamplingParams
    from sagellm_cuda.plugin import CudaPlatform

    config = EngineConfig(model=str(path), dtype="float32", load_format="safetensors",
                          num_kv_blocks=256, max_num_seqs=8, max_model_len=512,
                          enable_prefix_caching=False, **kw)
    engine = LLMEngine(config, platform=CudaPlatform(0))
    base = dict(max_tokens=NUM_TOKENS, ignore_eos=True, temperature=0.0)
    params = {
        "greedy_lp": SamplingParams(**base, logprobs=3),
        "penalised": SamplingParams(**base, repetition_penalty=1.3, presence_penalty=0.5,
                                    frequency_penalty=0.2),
        "biased": SamplingParams(**base, logit_bias={7: 50.0}),
        "seeded": SamplingParams(**{**base, "temperature": 0.9}, seed=5, n=2, logprobs=1),
        "prompt_lp": SamplingParams(**base, prompt_logprobs=2),
        "constrained": SamplingParams(**base),
        "plain": SamplingParams(**base),
    }
    for name, p in params.items():
        engine.add_request(_prompt(name), p, request_id=name,
                           constraint=(lambda: OnlyToken(99, 4)) if name == "constrained" else None)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[(out.request_id, out.index)] = out
    assert engine.block_manager.ref_counts == {}
    return done, int(getattr(engine.runner, "num_graph_steps", 0))


def test_graph_and_eager_runs_agree_with_every_feature(hf_model) -> None:  # type: ignore[no-untyped-def]
    path, _ = hf_model
    graphs, graph_steps = _run(path)
    eager, eager_steps = _run(path, enforce_eager=True)
    assert graph_steps > 0 and eager_steps == 0
    assert sorted(graphs) == sorted(eager)
    for key, g in graphs.items():
        e = eager[key]
        assert g.token_ids == e.token_ids, key
        assert g.finish_reason == e.finish_reason, key
        for a, b in ((g.logprobs, e.logprobs), (g.prompt_logprobs, e.prompt_logprobs)):
            assert (a is None) == (b is None)
            for x, y in zip(a or [], b or [], strict=True):
                if x is None:
                    assert y is None
                    continue
                assert x.token_id == y.token_id and x.logprob == pytest.approx(y.logprob, abs=1e-4)
    assert graphs[("biased", 0)].token_ids == [7] * NUM_TOKENS
    assert graphs[("constrained", 0)].token_ids == [99] * 4
    assert graphs[("constrained", 0)].finish_reason == "stop"


@torch.no_grad()
def test_logprobs_match_transformers(hf_model) -> None:  # type: ignore[no-untyped-def]
    path, model = hf_model
    done, _ = _run(path)
    out = done[("greedy_lp", 0)]
    prompt = _prompt("greedy_lp")
    ref = model(torch.tensor([prompt + out.token_ids], device="cuda")).logits[0].float().log_softmax(-1)
    for j, lp in enumerate(out.logprobs):
        assert lp.logprob == pytest.approx(ref[len(prompt) - 1 + j, lp.token_id].item(), abs=1e-3)
    out = done[("prompt_lp", 0)]
    prompt = _prompt("prompt_lp")
    ref = model(torch.tensor([prompt], device="cuda")).logits[0].float().log_softmax(-1)
    assert out.prompt_logprobs[0] is None
    for q in range(1, len(prompt)):
        assert out.prompt_logprobs[q].logprob == pytest.approx(ref[q - 1, prompt[q]].item(), abs=1e-3)
