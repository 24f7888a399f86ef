"""A tiny random Llama checkpoint and a greedy generation helper for end-to-end backend tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sagellm.config import EngineConfig
from sagellm.engine.llm_engine import LLMEngine
from sagellm.plugins import Registry
from sagellm.protocols import Platform
from sagellm.sampling_params import SamplingParams

#: Small enough to build in well under a second, big enough to have GQA (4 heads over 2 KV
#: heads), two layers and a head_dim of 16.
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)


def make_tiny_llama(path: str | Path, seed: int = 0, tokenizer: bool = False,
                    **overrides: Any) -> Path:
    """Write a random-weight Llama checkpoint (config.json + safetensors) to ``path``.

    With ``tokenizer=True`` a byte-level tokenizer (one token per byte, no merges, vocabulary
    256) is written too, so text prompts, the CLI and the server work; otherwise prompts are
    token ids. Weights are saved (not ``load_format=
    "dummy"``) so engines on different devices load bit-identical parameters; they are written
    directly under the Hugging Face names, without building a transformers model (fast).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_LLAMA, **overrides, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "hidden_act": "silu", "dtype": "float32"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def rand(*shape: int) -> torch.Tensor:
        # std 0.2 rather than HF's 0.02: larger logit gaps make greedy near-ties unlikely.
        return torch.randn(*shape, generator=gen) * 0.2

    weights = {"model.embed_tokens.weight": rand(cfg["vocab_size"], h),
               "model.norm.weight": torch.ones(h), "lm_head.weight": rand(cfg["vocab_size"], h)}
    for i in range(layers):
        pre = f"model.layers.{i}."
        weights.update({
            pre + "self_attn.q_proj.weight": rand(q, h), pre + "self_attn.k_proj.weight": rand(kv, h),
            pre + "self_attn.v_proj.weight": rand(kv, h), pre + "self_attn.o_proj.weight": rand(h, q),
            pre + "mlp.gate_proj.weight": rand(inter, h), pre + "mlp.up_proj.weight": rand(inter, h),
            pre + "mlp.down_proj.weight": rand(h, inter),
            pre + "input_layernorm.weight": torch.ones(h),
            pre + "post_attention_layernorm.weight": torch.ones(h),
        })
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        _write_byte_tokenizer(path)
    return path


def _write_byte_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}"}))


def greedy_engine(platform: Platform, model_dir: str | Path, **config: Any) -> LLMEngine:
    """An ``LLMEngine`` around the given platform instance (no discovery, so it works for a
    platform that is not installed as a plugin), with small blocks and chunked prefill (block
    size 4, 16-token prefill chunks, 32 tokens a step) so a few short prompts exercise paging;
    ``config`` overrides any setting."""
    settings: dict[str, Any] = dict(model=str(model_dir), dtype="float32", block_size=4,
                                    num_kv_blocks=128, max_num_batched_tokens=32,
                                    max_prefill_tokens=16)
    settings.update(config)
    return LLMEngine(EngineConfig(**settings), registry=Registry(), platform=platform)


def run_greedy(engine: LLMEngine, prompts: Sequence[Sequence[int]], max_tokens: int
               ) -> tuple[list[str], list[list[int]]]:
    """Greedy-decode token-id ``prompts`` to completion; their request ids and generated ids."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(list(p), params) for p in prompts]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.token_ids)
    return ids, [done[i] for i in ids]


def greedy_generate(platform: Platform, model_dir: str | Path, prompts: Sequence[Sequence[int]],
                    max_tokens: int = 8, **config: Any) -> list[list[int]]:
    """Greedy-decode token-id ``prompts`` on ``platform``; returns the generated ids per prompt
    (engine settings as in :func:`greedy_engine`)."""
    return run_greedy(greedy_engine(platform, model_dir, **config), prompts, max_tokens)[1]
