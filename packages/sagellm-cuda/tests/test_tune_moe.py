"""``benchmarks/tune_moe.py`` on the CPU: its smoke mode writes a table that loads back and that
``fused_experts`` runs with; the model config reading refuses what it cannot tune. The GPU run
itself (timings on an H200) is the lead's: see the script's docstring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sagellm_cuda import moe_tiles


@pytest.fixture(scope="module")
def tune_moe(load_benchmark):  # type: ignore[no-untyped-def]
    return load_benchmark("tune_moe")


@pytest.mark.interpreted
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU CI's (Triton's "
                    "interpreter is chosen when the kernels are defined)")
def test_smoke_writes_a_table_that_loads_back(tune_moe, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    other = moe_tiles.table_key(9, 1, 1, "float32", "down")
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2)
    (tmp_path / "cpu.json").write_text(json.dumps({"tables": {other: {"4": cfg}}}))
    path = tune_moe.main(["--smoke", "--out", str(tmp_path)])
    assert path == tmp_path / "cpu.json"
    doc = json.loads(path.read_text())
    tables = moe_tiles.parse_tables(doc, str(path))
    assert other in tables, "an existing table of another shape is kept"
    up_key = moe_tiles.table_key(4, 32, 32, "float32", "gate_up")
    down_key = moe_tiles.table_key(4, 32, 32, "float32", "down")
    assert sorted(tables[up_key]) == sorted(tables[down_key]) == tune_moe.SMOKE_TOKENS
    monkeypatch.setenv(moe_tiles.ENV_VAR, str(path))
    moe_tiles.clear_cache()
    try:
        up, down = moe_tiles.tile_configs(8, 2, 4, 32, 32, torch.float32, torch.device("cpu"))
        assert up == tables[up_key][8] and down == tables[down_key][8]
        from sagellm.layers.moe import experts_reference, select_experts
        from sagellm_cuda.moe import fused_experts

        g = torch.Generator().manual_seed(1)
        x, w13, w2 = torch.randn(8, 32, generator=g), torch.randn(4, 64, 32, generator=g) / 6, \
            torch.randn(4, 32, 32, generator=g) / 6
        weights, ids = select_experts(torch.randn(8, 4, generator=g), 2, True)
        torch.testing.assert_close(fused_experts(x, w13, w2, weights, ids),
                                   experts_reference(x, w13, w2, weights, ids),
                                   rtol=1e-4, atol=1e-5)
    finally:
        moe_tiles.clear_cache()


def test_search_space(tune_moe) -> None:  # type: ignore[no-untyped-def]
    shape = tune_moe.Shape(128, 8, 2048, 768, torch.bfloat16)
    assert tune_moe.block_ms(1, shape) == [16] and tune_moe.block_ms(4096, shape) == [64, 128]
    for gemm in ("gate_up", "down"):
        for bm in (16, 32, 64, 128):
            grid = tune_moe.coarse_grid(gemm, bm, 2)
            assert grid and all(tune_moe.fits(c, gemm, 2) and c["BLOCK_M"] == bm for c in grid)
            for c in tune_moe.refine_grid(grid[0], gemm, 2):
                moe_tiles.check_config(c, "refined")
    assert not tune_moe.fits(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=1,
                                  num_warps=4, num_stages=3), "gate_up", 2)


def test_reuse_prefers_a_config_already_in_the_table(tune_moe) -> None:  # type: ignore[no-untyped-def]
    a = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    b = {**a, "BLOCK_N": 64}
    f = tune_moe.freeze
    timings = {(8, "down", f(a)): 10.0, (8, "down", f(b)): 10.2}
    assert tune_moe.reuse(a, 8, "down", [b], timings) == b
    timings[8, "down", f(b)] = 11.0
    assert tune_moe.reuse(a, 8, "down", [b], timings) == a


@pytest.mark.parametrize("config,msg", [
    ({"hidden_size": 8, "num_experts_per_tok": 2, "intermediate_size": 8}, "num_experts"),
    ({"num_experts": 4, "hidden_size": 8, "num_experts_per_tok": 2}, "intermediate_size"),
    ({"num_local_experts": 4, "hidden_size": 8, "num_experts_per_tok": 2,
      "intermediate_size": 9}, "--tp 2")])
def test_read_shape_refuses(tune_moe, tmp_path: Path, config: dict,  # type: ignore[no-untyped-def]
                            msg: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=msg):
        tune_moe.read_shape(tmp_path, 2, torch.bfloat16)


def test_read_shape_qwen3_30b(tune_moe) -> None:  # type: ignore[no-untyped-def]
    model = Path(__file__).parents[2] / "sagellm-core/benchmarks/models/qwen3-30b-a3b-arch"
    s = tune_moe.read_shape(model, 1, torch.bfloat16)
    assert (s.experts, s.top_k, s.hidden, s.inter) == (128, 8, 2048, 768)
    with pytest.raises(SystemExit, match="no config.json"):
        tune_moe.read_shape(model / "nope", 1, torch.bfloat16)


def test_needs_cuda_without_smoke(tune_moe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if torch.cuda.is_available():
        pytest.skip("has a CUDA device")
    with pytest.raises(SystemExit, match="CUDA"):
        tune_moe.main(["--out", str(tmp_path)])


def test_precompiler_survives_failing_workers(tune_moe,  # type: ignore[no-untyped-def]
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers that cannot compile (here: no CUDA) cost nothing but a message."""
    if torch.cuda.is_available():
        pytest.skip("has a CUDA device")
    monkeypatch.syspath_prepend(str(Path(tune_moe.__file__).parent))  # the spawned workers import it
    shape = tune_moe.Shape(4, 2, 32, 32, torch.float32)
    pre = tune_moe.Precompiler(1, shape)
    try:
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2)
        pre.compile([("down", cfg)], timeout_s=60)
        assert ("down", tune_moe.freeze(cfg)) in pre.done
        pre.compile([("down", cfg)], timeout_s=60)  # already tried: nothing queued
    finally:
        pre.close()
