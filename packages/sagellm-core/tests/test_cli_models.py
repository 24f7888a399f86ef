"""``sagellm models`` and the engine's refusal of attention a backend cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.cli import main
from sagellm.models import MODEL_REGISTRY
from sagellm.protocols import AttentionLayerSpec, Capabilities
from sagellm.testing.families import TINY_WINDOW, save_tiny_family
from sagellm.testing.tiny_model import greedy_generate


def test_models_lists_every_architecture_and_backend_support(capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for arch in ("Qwen3ForCausalLM", "MistralForCausalLM", "Gemma2ForCausalLM",
                 "Gemma3ForCausalLM", "Phi3ForCausalLM", "LlamaForCausalLM"):
        assert arch in text
    gemma2 = next(line for line in text.splitlines() if "Gemma2ForCausalLM" in line)
    assert "sliding window, soft-cap" in gemma2
    cpu = next(line for line in text.splitlines() if line.strip().startswith("cpu "))
    assert "yes / yes" in cpu


def test_models_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert [a["architecture"] for a in table["architectures"]] == sorted(MODEL_REGISTRY)
    phi3 = next(a for a in table["architectures"] if a["architecture"] == "Phi3ForCausalLM")
    assert phi3["model_types"] == ["phi3"] and phi3["attention_features"] == ["sliding_window"]
    cpu = next(b for b in table["backends"] if b["name"] == "cpu")
    assert cpu["sliding_window"] is True and cpu["logits_soft_cap"] is True


class FullAttentionOnly(CpuPlatform):
    """The CPU device, claiming neither sliding windows nor soft-caps."""

    name = "full-only"

    @classmethod
    def capabilities(cls) -> Capabilities:
        caps = CpuPlatform.capabilities()
        return Capabilities(dtypes=caps.dtypes, default_dtype=caps.default_dtype, priority=0)


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_family(tmp_path_factory.mktemp("gemma2"), "gemma2")


def test_engine_refuses_a_windowed_soft_capped_model_on_a_backend_without_them(
        gemma2_dir: Path) -> None:
    with pytest.raises(ValueError) as err:
        greedy_generate(FullAttentionOnly(), gemma2_dir, [[3, 4, 5]], max_tokens=2)
    msg = str(err.value)
    assert "'full-only'" in msg and "sliding-window attention (layers 0)" in msg
    assert "soft-capping (layers 0, 1)" in msg and "sagellm models" in msg


def test_engine_runs_a_plain_model_on_that_backend(tmp_path: Path) -> None:
    model_dir = save_tiny_family(tmp_path, "qwen3")
    out = greedy_generate(FullAttentionOnly(), model_dir, [[3, 4, 5]], max_tokens=2)
    assert len(out[0]) == 2


@pytest.mark.parametrize("kwargs,field", [(dict(sliding_window=0), "sliding_window"),
                                          (dict(sliding_window=2.5), "sliding_window"),
                                          (dict(logits_soft_cap=-1.0), "logits_soft_cap"),
                                          (dict(logits_soft_cap=0.0), "logits_soft_cap")])
def test_layer_spec_rejects_bad_values(kwargs: dict, field: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=field):
        AttentionLayerSpec(**kwargs)


def test_window_one_sees_only_itself() -> None:
    """A window of one token: each query attends to its own key only (output = its value)."""
    from sagellm.backends.torch_attention import TorchAttentionBackend
    from sagellm.testing.reference import make_paged_case

    case = make_paged_case([TINY_WINDOW + 3], [0], 2, 2, 8, 4)
    attn = TorchAttentionBackend()
    kc = torch.zeros(case.num_blocks, 4, 2, 8)
    vc = torch.zeros_like(kc)
    out = attn.prefill(case.queries[0], case.keys[0], case.values[0], kc, vc,
                       case.prefill_metadata(torch.device("cpu")), 0.3,
                       layer=AttentionLayerSpec(sliding_window=1))
    torch.testing.assert_close(out, case.values[0])
