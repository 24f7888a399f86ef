"""Mixture-of-experts: routing and expert math against independent references, Mixtral and
Qwen3-MoE against transformers (fp32, same weights), and configs the layer cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sagellm import LLM
from sagellm.backends.cpu import CpuPlatform
from sagellm.layers.moe import (
    MoEExperts,
    SparseMoEBlock,
    expert_target,
    experts_reference,
    select_experts,
)
from sagellm.testing.families import PARITY_PROMPT_LEN, TINY_COMMON, engine_greedy, hf_greedy
from sagellm.testing.tiny_moe import TINY_MOE, save_tiny_moe

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_moe(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral")


def parity_prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    lens = [PARITY_PROMPT_LEN, PARITY_PROMPT_LEN + 6, 5]
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("name", list(TINY_MOE))
def test_moe_family_matches_transformers(name: str, mixtral_dir: Path, tmp_path: Path) -> None:
    model_dir = mixtral_dir if name == "mixtral" else save_tiny_moe(tmp_path / name, name)
    prompts = parity_prompts(TINY_COMMON["vocab_size"])
    want_tokens, want_logits = hf_greedy(model_dir, prompts, NEW_TOKENS)
    got_tokens, got_logits = engine_greedy(CpuPlatform(), model_dir, prompts, NEW_TOKENS)
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_qwen3_moe_layers_sparse_or_dense(tmp_path: Path) -> None:
    from sagellm.models.llama import LlamaMLP

    d = save_tiny_moe(tmp_path / "q", "qwen3_moe", num_hidden_layers=4, mlp_only_layers=[3],
              decoder_sparse_step=2)
    llm = LLM(model=str(d))
    kinds = [type(layer.mlp) for layer in llm.engine.model.layers]
    # Sparse where (i + 1) % 2 == 0 (layers 1 and 3), except the listed dense layer 3.
    assert kinds == [LlamaMLP, SparseMoEBlock, LlamaMLP, LlamaMLP]
    assert llm.engine.model.layers[1].mlp.experts.renormalize is False


def test_mixtral_stacks_expert_weights(mixtral_dir: Path) -> None:
    from safetensors import safe_open

    llm = LLM(model=str(mixtral_dir))
    experts = llm.engine.model.layers[1].mlp.experts
    assert isinstance(experts, MoEExperts)
    assert tuple(experts.w13.shape) == (8, 2 * 48, 64) and tuple(experts.w2.shape) == (8, 64, 48)
    with safe_open(str(mixtral_dir / "model.safetensors"), "pt") as f:
        pre = "model.layers.1.block_sparse_moe.experts.5."
        assert torch.equal(experts.w13[5, :48], f.get_tensor(pre + "w1.weight"))
        assert torch.equal(experts.w13[5, 48:], f.get_tensor(pre + "w3.weight"))
        assert torch.equal(experts.w2[5], f.get_tensor(pre + "w2.weight"))


# -- routing and expert math -----------------------------------------------------------------


@pytest.mark.parametrize("arch,norm_topk", [("mixtral", True), ("qwen3_moe", True),
                                            ("qwen3_moe", False)])
def test_router_choice_matches_transformers(arch: str, norm_topk: bool) -> None:
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    if arch == "mixtral":  # always renormalises the chosen weights
        router = MixtralTopKRouter(transformers.MixtralConfig(
            hidden_size=32, num_local_experts=8, num_experts_per_tok=2))
    else:
        router = Qwen3MoeTopKRouter(transformers.Qwen3MoeConfig(
            hidden_size=32, num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk))
    g = torch.Generator().manual_seed(3)
    router.weight.data = torch.randn(8, 32, generator=g)
    x = torch.randn(50, 32, generator=g)
    with torch.no_grad():
        _, want_w, want_ids = router(x)
    got_w, got_ids = select_experts(F.linear(x, router.weight), router.top_k, norm_topk)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w.float())


def _per_token(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor:
    """Token by token, choice by choice, float64: the definition, slowly."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist(), strict=True):
            h = w13[e].double() @ x[t].double()
            out[t] += w * (w2[e].double() @ (F.silu(h[:inter]) * h[inter:]))
    return out


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 4, 1), (13, 8, 2), (9, 6, 6)])
def test_experts_match_definition(tokens: int, experts: int, top_k: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    moe = MoEExperts(experts, top_k, hidden=24, intermediate=20, renormalize=False)
    moe.w13.data = torch.randn(experts, 40, 24, generator=g) * 0.2
    moe.w2.data = torch.randn(experts, 24, 20, generator=g) * 0.2
    x, logits = torch.randn(tokens, 24, generator=g), torch.randn(tokens, experts, generator=g)
    weights, ids = select_experts(logits, top_k, False)
    want = _per_token(x, moe.w13.data, moe.w2.data, weights, ids)
    torch.testing.assert_close(moe(x, logits).double(), want, atol=1e-5, rtol=1e-5)
    assert moe(x[:0], logits[:0]).shape == (0, 24)


def test_expert_names_map_to_stacked_parameters() -> None:
    assert expert_target("layers.2.mlp.experts.7.w3.weight") == ("layers.2.mlp.experts.w13", ("up", 7))
    assert expert_target("layers.0.mlp.experts.11.down_proj.weight") == (
        "layers.0.mlp.experts.w2", ("down", 11))
    assert expert_target("layers.0.mlp.experts.gate_up_proj") == (
        "layers.0.mlp.experts.w13", ("gate_up", None))
    assert expert_target("layers.0.mlp.gate_proj.weight") is None
    assert expert_target("layers.0.mlp.experts.3.w9.weight") is None


def test_stacked_checkpoint_tensors_load_like_per_expert_ones() -> None:
    """transformers' in-memory layout (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])
    loads to the same parameters as one tensor per expert."""
    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g),
                      torch.randn(4, 8, 6, generator=g))
    a, b = MoEExperts(4, 2, 8, 6, True), MoEExperts(4, 2, 8, 6, True)
    for e in range(4):
        a._load(a.w13, gate[e], ("gate", e))
        a._load(a.w13, up[e], ("up", e))
        assert a.missing_weights()[0] == f"expert {e} down"
        a._load(a.w2, down[e], ("down", e))
    b._load(b.w13, torch.cat([gate, up], 1), ("gate_up", None))
    b._load(b.w2, down, ("down", None))
    assert a.missing_weights() == [] == b.missing_weights()
    assert torch.equal(a.w13, b.w13) and torch.equal(a.w2, b.w2)
    with pytest.raises(ValueError, match="expert 4, but the config has 4"):
        a._load(a.w2, down[0], ("down", 4))
    with pytest.raises(ValueError, match=r"shape \(6, 6\)"):
        a._load(a.w13, torch.zeros(6, 6), ("gate", 0))


def test_sparse_block_is_router_then_experts() -> None:
    block = SparseMoEBlock(hidden=16, intermediate=8, num_experts=4, top_k=2, renormalize=True)
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(5, 16)
    want = block.experts(x, F.linear(x, block.gate.weight))
    assert torch.equal(block(x), want)


# -- configs the layer cannot run --------------------------------------------------------------


def _hostile(path: Path, arch: str, **fields: object) -> Path:
    d = save_tiny_moe(path, arch)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("fields,match", [
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) must be between 1 and the number "
                                 r"of experts \(8\)"),
    ({"num_experts_per_tok": 0}, r"num_experts_per_tok \(0\)"),
    ({"num_local_experts": 0}, r"number of experts \(0\) must be at least 1"),
    ({"hidden_act": "gelu"}, "activation 'gelu' is not supported"),
])
def test_hostile_mixtral_config_refused_at_load(tmp_path: Path, fields: dict[str, object],
                                                match: str) -> None:
    d = _hostile(tmp_path / "m", "mixtral", **fields)
    with pytest.raises(ValueError, match=match):
        LLM(model=str(d))


def test_hostile_qwen3_moe_config_refused_at_load(tmp_path: Path) -> None:
    d = _hostile(tmp_path / "q", "qwen3_moe", num_experts_per_tok=7)
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(7\) must be between 1 and the "
                                         r"number of experts \(6\)"):
        LLM(model=str(d))


def test_checkpoint_missing_an_expert_is_refused(tmp_path: Path, mixtral_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((mixtral_dir / "config.json").read_text())
    weights = load_file(str(mixtral_dir / "model.safetensors"))
    del weights["model.layers.0.block_sparse_moe.experts.6.w3.weight"]
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 expert tensors of layers.0.mlp.experts, "
                                         r"e.g. \['expert 6 up'\]"):
        LLM(model=str(d))


# -- tensor parallel ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_tp2_matches_tp1(name: str, mixtral_dir: Path, tmp_path: Path) -> None:
    """Two gloo ranks, each with every expert's half of the intermediate dimension, give the
    tokens of one rank."""
    from sagellm import SamplingParams

    model_dir = str(mixtral_dir if name == "mixtral" else save_tiny_moe(tmp_path / name, name))
    engine = dict(num_kv_blocks=128, max_num_batched_tokens=64, max_prefill_tokens=32)
    prompts = parity_prompts(TINY_COMMON["vocab_size"])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in LLM(model=model_dir, **engine).generate(prompts, params,
                                                                        use_tqdm=False)]
    llm = LLM(model=model_dir, tensor_parallel_size=2, **engine)
    try:
        experts = llm.engine.model.layers[1].mlp.experts
        assert experts.intermediate_per_rank == experts.w2.shape[2] == 48 // 2
        assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    finally:
        llm.engine.shutdown()


class GatherMoEExperts(MoEExperts):
    """Another way to the same numbers: each pair gathers its expert's weights (no sorting)."""

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        w13, w2 = self.w13[ids], self.w2[ids]  # [T, k, 2I, H], [T, k, H, I]
        h = torch.einsum("th,tkih->tki", x, w13)
        gate, up = h.chunk(2, -1)
        y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, w2)
        return (y * weights[..., None].to(y.dtype)).sum(1)


def test_moe_layer_case_accepts_a_correct_replacement_and_catches_a_wrong_one() -> None:
    from sagellm.layers.registry import LayerKind
    from sagellm.testing.layers import check_layer_replacement

    check_layer_replacement(LayerKind.MOE_EXPERTS, GatherMoEExperts, torch.device("cpu"),
                            torch.float32, 2e-4)

    class IgnoresRenormalize(MoEExperts):
        def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
            weights, ids = select_experts(router_logits, self.top_k, True)
            return experts_reference(x, self.w13, self.w2, weights, ids)

    with pytest.raises(AssertionError, match="IgnoresRenormalize"):
        check_layer_replacement(LayerKind.MOE_EXPERTS, IgnoresRenormalize, torch.device("cpu"),
                                torch.float32, 2e-4)


def test_config_only_directory_runs_with_dummy_weights(tmp_path: Path, mixtral_dir: Path) -> None:
    """As ``sagellm bench`` runs the Qwen3-30B-A3B architecture directory: no weights at all."""
    import shutil

    from sagellm import SamplingParams

    d = tmp_path / "arch"
    d.mkdir()
    shutil.copy(mixtral_dir / "config.json", d / "config.json")
    llm = LLM(model=str(d), load_format="dummy")
    experts = llm.engine.model.layers[0].mlp.experts
    assert experts.w13.std() > 0 and experts.w2.std() > 0
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].token_ids) == 4


def test_bench_architecture_directory_is_qwen3_30b_a3b() -> None:
    import torch.nn as nn
    from transformers import AutoConfig

    from sagellm.models import resolve_model_class

    d = Path(__file__).parents[1] / "benchmarks" / "models" / "qwen3-30b-a3b-arch"
    config = AutoConfig.from_pretrained(str(d))
    with torch.device("meta"):
        model = resolve_model_class(config)(config)
    assert isinstance(model, nn.Module)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 1) == 30.5
    experts = model.layers[47].mlp.experts
    assert (experts.num_experts, experts.top_k, experts.renormalize) == (128, 8, True)
    assert tuple(experts.w13.shape) == (128, 2 * 768, 2048)
    assert (d / "tokenizer.json").exists()
