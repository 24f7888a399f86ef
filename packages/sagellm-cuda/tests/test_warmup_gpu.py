"""The start-up warm-up on the GPU: after it, traffic shaped like ``serve_c16`` (bursts of
512-token prompts, prompts joining running decodes, contexts growing to 768 tokens), plain and
with each API feature (penalties, ``logprobs=5``, a JSON schema), compiles no Triton kernel:
no request waits for a compile. Greedy answers equal those of an engine that did not warm up.

Run on a GPU machine: ``pytest -m gpu packages/sagellm-cuda/tests/test_warmup_gpu.py``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm.sampling_params import SamplingParams
from sagellm.structured.params import StructuredOutputParams
from sagellm.testing.tiny_model import make_tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.default_warmup]

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"]}
FEATURES: dict[str, dict[str, Any]] = {
    "plain": {},
    "penalties": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1},
    "logprobs5": {"logprobs": 5},
    "json_schema": {"structured_output": StructuredOutputParams(json_schema=SCHEMA)},
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head_dim 64 and GQA, as the served models have: the kernels specialise on both.
    return make_tiny_llama(tmp_path_factory.mktemp("warm"), tokenizer=True, hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=2048)


def _engine(model: Path, **kw: Any):  # type: ignore[no-untyped-def]
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm_cuda.plugin import CudaPlatform

    return LLMEngine(EngineConfig(model=str(model), max_model_len=2048, max_num_seqs=64,
                                  num_kv_blocks=2048, **kw), platform=CudaPlatform(0))


def _serve_like(engine: Any, feature: dict[str, Any], seed: int) -> dict[str, list[int]]:
    """16 clients, 32 requests of 512 prompt tokens and 64 to 256 output tokens: a request
    joins as soon as one ends (closed loop, like serve_c16's clients)."""
    g = torch.Generator().manual_seed(seed)
    todo = [(f"r{seed}-{i}", torch.randint(3, 250, (512,), generator=g).tolist(),
             int(torch.randint(64, 257, (1,), generator=g))) for i in range(32)]
    done: dict[str, list[int]] = {}

    def add() -> None:
        rid, prompt, n = todo.pop(0)
        engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0,
                                                  ignore_eos="structured_output" not in feature,
                                                  **feature), request_id=rid)

    for _ in range(16):
        add()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.error is None, out
                done[out.request_id] = list(out.token_ids)
                if todo:
                    add()
    return done


def test_after_the_warmup_serving_traffic_compiles_no_kernel(model: Path) -> None:
    from sagellm_cuda import jit_watch

    engine = _engine(model)
    assert engine.warmup is not None and engine.warmup.error is None, engine.warmup
    assert engine.warmup.requests.keys() == {"plain", "sampling", "grammar"}
    before, seen = Counter(jit_watch.counts), len(jit_watch.recent)
    for i, feature in enumerate(FEATURES.values()):
        assert len(_serve_like(engine, feature, seed=i)) == 32
    compiled = Counter(jit_watch.counts) - before
    specs = "\n".join(f"{n}: {r}" for n, r in list(jit_watch.recent)[seen:])
    assert not compiled, f"compiled while serving after the warm-up: {dict(compiled)}\n{specs}"


def test_greedy_answers_after_the_warmup_equal_a_cold_engine(model: Path) -> None:
    cold = _serve_like(_engine(model, warmup=False), {}, seed=7)
    warm = _engine(model, warmup=True)
    assert warm.warmup is not None and warm.warmup.error is None
    assert _serve_like(warm, {}, seed=7) == cold
