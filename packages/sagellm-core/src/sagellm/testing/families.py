"""Tiny random checkpoints of every supported family, built with transformers, and its greedy
reference: the parity tests of ``tests/test_families.py`` (CPU, fp32) and of the GPU run.

Each entry of :data:`TINY_FAMILIES` is a transformers config and model class plus the settings
that exercise what sets the family apart (a sliding window shorter than the test prompts,
soft-capping, local and global layers, long-rope factors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sagellm.protocols import Platform

#: Sliding window of the windowed test configs: shorter than :data:`PARITY_PROMPT_LEN`.
TINY_WINDOW = 8
#: Prompt length of the parity tests: longer than the window and than a 16-token prefill chunk.
PARITY_PROMPT_LEN = 21

TINY_COMMON: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=1, bos_token_id=0,
)


@dataclass(frozen=True)
class TinyFamily:
    """A transformers config/model class pair and the overrides of :data:`TINY_COMMON`."""

    config_cls: str
    model_cls: str
    overrides: dict[str, Any] = field(default_factory=dict)
    #: Move the norm weights off their initial value (so a wrong norm formula shows). Off for
    #: Llama and Qwen2, whose checkpoints other tests have used since before this kit.
    perturb_norms: bool = True


_GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=TINY_WINDOW,
              tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")

TINY_FAMILIES: dict[str, TinyFamily] = {
    "llama": TinyFamily("LlamaConfig", "LlamaForCausalLM", perturb_norms=False),
    "qwen2": TinyFamily("Qwen2Config", "Qwen2ForCausalLM", perturb_norms=False),
    "qwen3": TinyFamily("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    # Layer 0 full, layer 1 windowed (Qwen3 slides from ``max_window_layers`` on).
    "qwen3-sliding": TinyFamily("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=16, use_sliding_window=True, sliding_window=TINY_WINDOW, max_window_layers=1)),
    "mistral": TinyFamily("MistralConfig", "MistralForCausalLM", dict(
        head_dim=16, sliding_window=TINY_WINDOW)),
    "gemma2": TinyFamily("Gemma2Config", "Gemma2ForCausalLM", dict(
        _GEMMA, attn_logit_softcapping=0.5, final_logit_softcapping=1.5,
        layer_types=["sliding_attention", "full_attention"])),
    "gemma3": TinyFamily("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _GEMMA, final_logit_softcapping=None, attn_logit_softcapping=None,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}})),
    # Fused qkv/gate-up and long-rope; prompts stay under ``original_max_position_embeddings``,
    # where transformers uses the short factors (see ``sagellm.layers.rotary``).
    "phi3": TinyFamily("Phi3Config", "Phi3ForCausalLM", dict(
        pad_token_id=0, original_max_position_embeddings=64, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)]})),
}


def save_tiny_family(path: str | Path, family: str, seed: int = 1234, **overrides: Any) -> Path:
    """Build a random ``family`` model with transformers and save it (safetensors) to ``path``."""
    import transformers

    spec = TINY_FAMILIES[family]
    config = getattr(transformers, spec.config_cls)(**{**TINY_COMMON, **spec.overrides,
                                                       **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_cls)(config)
    # Larger-than-default weights so logits are far from ties and greedy paths are stable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                if spec.perturb_norms:
                    p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0, 0.08)
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_greedy(model_dir: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int
              ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy tokens (fp32, eager attention) and the logits of each new token
    (``[max_new_tokens, vocab]`` per prompt)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    tokens, logits = [], []
    for p in prompts:
        ids = torch.tensor([list(p)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, output_logits=True,
                                 return_dict_in_generate=True)
        tokens.append(out.sequences[0, len(p):].tolist())
        logits.append(torch.cat(out.logits).float())
    return tokens, logits


def engine_greedy(platform: Platform, model_dir: str | Path, prompts: Sequence[Sequence[int]],
                  max_tokens: int, **config: Any) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of an ``LLMEngine`` on ``platform`` and the logits each token was picked
    from (``[max_tokens, vocab]`` per prompt, on the CPU). Settings as in
    :func:`~sagellm.testing.tiny_model.greedy_engine` (chunked prefill, block size 4)."""
    from sagellm.testing.tiny_model import greedy_engine, run_greedy

    engine = greedy_engine(platform, model_dir, **config)
    runner = engine.runner
    rows: dict[str, list[torch.Tensor]] = {}
    # Every step's sampling goes through ``sample_tokens`` (eager steps, graph steps and
    # ``sample`` itself), so wrapping it records each sampled row's logits.
    sample_tokens = runner.sample_tokens  # type: ignore[attr-defined]

    def recording_sample_tokens(logits: torch.Tensor, seqs: list[Any], **kwargs: Any) -> Any:
        for seq, row in zip(seqs, logits, strict=True):
            rows.setdefault(seq.request_id, []).append(row.float().cpu())
        return sample_tokens(logits, seqs, **kwargs)

    runner.sample_tokens = recording_sample_tokens  # type: ignore[attr-defined]
    # A runner whose graphs end in an argmax skips sampling for greedy rows; asking it to
    # sample from the graph's logits instead keeps the graph's forward under test and lets
    # every row's logits be recorded.
    runner.argmax_suffices = lambda seqs: False  # type: ignore[attr-defined]
    runner.argmax_is_token = lambda seqs: False  # type: ignore[attr-defined]
    ids, tokens = run_greedy(engine, prompts, max_tokens)
    engine.shutdown()
    return tokens, [torch.stack(rows[i]) for i in ids]


def check_fp32_parity(platform: Platform, model_dir: str | Path,
                      prompts: Sequence[Sequence[int]], max_tokens: int, label: str = "") -> None:
    """Assert that ``platform``'s greedy tokens equal transformers' (fp32, CPU) on ``prompts``
    and that the logits each was picked from are close (1e-3)."""
    want_tokens, want_logits = hf_greedy(model_dir, prompts, max_tokens)
    got_tokens, got_logits = engine_greedy(platform, model_dir, prompts, max_tokens)
    assert got_tokens == want_tokens, label
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@torch.no_grad()
def check_bf16_parity(platform: Platform, model_dir: str | Path,
                      prompts: Sequence[Sequence[int]], max_tokens: int, label: str = "") -> None:
    """Assert that each token ``platform`` picks in bf16 is within bf16 rounding (0.1 standard
    deviations of the logits) of the best token of the fp32 reference fed those tokens."""
    from transformers import AutoModelForCausalLM

    ours, _ = engine_greedy(platform, model_dir, prompts, max_tokens, dtype="bfloat16")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    for prompt, toks in zip(prompts, ours, strict=True):
        assert len(toks) == max_tokens
        logits = ref(torch.tensor([list(prompt) + toks[:-1]])).logits[0, len(prompt) - 1:].float()
        best = logits.max(-1).values
        picked = logits.gather(-1, torch.tensor(toks)[:, None])[:, 0]
        gap = ((best - picked) / logits.std(-1)).max().item()
        assert gap <= 0.1, f"{label}: a token {gap:.4f} std below the reference's best"
