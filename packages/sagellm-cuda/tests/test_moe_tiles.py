"""Tuned MoE tile tables: the file format checked field by field, the bucket lookup, the
fallback to the heuristic, and ``fused_experts`` taking its tiles from a table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sagellm_cuda import moe_tiles
from sagellm_cuda.moe_tiles import (
    block_config,
    check_config,
    device_slug,
    parse_tables,
    pick_bucket,
    table_key,
    tile_configs,
)

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
CFG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)


pytestmark = pytest.mark.usefixtures("fresh_tile_tables")


def _write(path: Path, tables: dict) -> Path:
    path.write_text(json.dumps({"device": "cpu", "tables": tables}))
    return path


def test_slug_and_key() -> None:
    assert device_slug("NVIDIA H200") == "nvidia_h200"
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert table_key(128, 768, 2048, torch.bfloat16, "gate_up") == \
        "E=128,N=768,K=2048,dtype=bfloat16,gemm=gate_up"
    with pytest.raises(ValueError, match="gemm"):
        table_key(8, 1, 1, "float32", "up")


def test_pick_bucket_at_or_above_else_largest() -> None:
    buckets = {1: {"a": 1}, 16: {"a": 16}, 256: {"a": 256}}
    assert [pick_bucket(buckets, t)["a"] for t in (1, 2, 16, 17, 256, 9000)] == \
        [1, 16, 16, 256, 256, 256]


@pytest.mark.parametrize("cfg,field", [
    ({**CFG, "BLOCK_N": 48}, "BLOCK_N"), ({**CFG, "num_warps": 0}, "num_warps"),
    ({**CFG, "GROUP_M": "1"}, "GROUP_M"), ({k: v for k, v in CFG.items() if k != "BLOCK_K"},
                                           "BLOCK_K"),
    ({**CFG, "BLOCK_M": 8}, "at least 16"), ({**CFG, "num_stages": True}, "num_stages"),
    ({**CFG, "BLOCK_Q": 16}, "unknown field"), ([16, 32], "must be an object")])
def test_bad_config_named(cfg: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        check_config(cfg, "here")


@pytest.mark.parametrize("doc,msg", [
    ([], "'tables'"), ({"tables": []}, "'tables'"), ({"tables": {"k": {}}}, "non-empty"),
    ({"tables": {"k": {"x": CFG}}}, "'x' is not an integer"),
    ({"tables": {"k": {"0": CFG}}}, "must be >= 1")])
def test_bad_table_named(doc: object, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parse_tables(doc, "f.json")


def test_bad_json_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cpu.json").write_text("{not json")
    monkeypatch.setenv(moe_tiles.ENV_VAR, str(tmp_path))
    with pytest.raises(ValueError, match="not valid JSON"):
        tile_configs(4, 2, 4, 32, 32, torch.float32, torch.device("cpu"))
    moe_tiles.clear_cache()
    monkeypatch.setenv(moe_tiles.ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="no such file"):
        tile_configs(4, 2, 4, 32, 32, torch.float32, torch.device("cpu"))


def test_lookup_per_gemm_and_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    up_small, up_big = CFG, {**CFG, "BLOCK_M": 32}
    down = {**CFG, "BLOCK_N": 16}
    path = _write(tmp_path / "t.json", {
        table_key(4, 32, 64, torch.float32, "gate_up"): {"1": up_small, "8": up_big},
        table_key(4, 64, 32, torch.float32, "down"): {"8": down}})
    monkeypatch.setenv(moe_tiles.ENV_VAR, str(path))
    cpu = torch.device("cpu")
    assert tile_configs(1, 2, 4, 64, 32, torch.float32, cpu) == (up_small, down)
    assert tile_configs(5, 2, 4, 64, 32, torch.float32, cpu) == (up_big, down)
    assert tile_configs(500, 2, 4, 64, 32, torch.float32, cpu) == (up_big, down)
    # Another shape or dtype: the heuristic for both.
    heur = block_config(5 * 2, 4)
    assert tile_configs(5, 2, 4, 64, 32, torch.bfloat16, cpu) == (heur, heur)
    assert tile_configs(5, 2, 8, 64, 32, torch.float32, cpu) == (block_config(10, 8),) * 2


def test_no_table_means_heuristic() -> None:
    # No shipped table is named after "cpu".
    assert tile_configs(3, 8, 128, 2048, 768, torch.bfloat16, torch.device("cpu")) == \
        (block_config(24, 128),) * 2


@pytest.mark.interpreted
def test_fused_experts_uses_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table whose down GEMM has another BLOCK_M: the result still matches the reference."""
    from sagellm.layers.moe import experts_reference, select_experts
    from sagellm_cuda.moe import fused_experts

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g).to(DEV)
    w13 = (torch.randn(4, 64, 32, generator=g) / 6).to(DEV)
    w2 = (torch.randn(4, 32, 32, generator=g) / 6).to(DEV)
    weights, ids = select_experts(torch.randn(6, 4, generator=g).to(DEV), 2, True)
    path = _write(tmp_path / "t.json", {
        table_key(4, 32, 32, torch.float32, "gate_up"): {"8": CFG},
        table_key(4, 32, 32, torch.float32, "down"): {"8": {**CFG, "BLOCK_M": 32}}})
    monkeypatch.setenv(moe_tiles.ENV_VAR, str(path))
    got = fused_experts(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, experts_reference(x, w13, w2, weights, ids),
                               rtol=1e-4, atol=1e-5)
