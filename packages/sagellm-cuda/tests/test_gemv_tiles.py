"""Tuned decode-product tables: the format checked field by field (a malformed table is refused,
naming the file, key and field), the row-bucket lookup, the fallback to each kernel's heuristic,
and fp8_gemv / w4a16_matmul launching what the table says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sagellm_cuda import fp8_kernels, gemv_tiles, int4_gemm
from sagellm_cuda.gemv_tiles import check_config, parse_tables, table_key, tuned_config

HAS_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
ACT = torch.bfloat16 if HAS_CUDA else torch.float32
CFG = dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=2)


pytestmark = pytest.mark.usefixtures("fresh_tile_tables")


def _use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tables: dict) -> Path:
    name = torch.cuda.get_device_name(DEV) if HAS_CUDA else "cpu"
    path = tmp_path / f"{gemv_tiles.device_slug(name)}.json"
    path.write_text(json.dumps({"device": name, "tables": tables}))
    monkeypatch.setenv(gemv_tiles.ENV_VAR, str(tmp_path))
    gemv_tiles.clear_cache()
    return path


def test_key_names_kind_shape_group_dtype() -> None:
    assert table_key("fp8", 6144, 4096, 0, torch.bfloat16) == \
        "kind=fp8,N=6144,K=4096,group=0,dtype=bfloat16"
    with pytest.raises(ValueError, match="kind must be one of"):
        table_key("int8", 1, 1, 0, "bfloat16")


def test_lookup_takes_the_smallest_bucket_at_or_above(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    key = table_key("fp8", 48, 256, 0, ACT)
    wide = dict(CFG, BLOCK_M=16, BLOCK_N=32)
    _use(tmp_path, monkeypatch, {key: {"4": CFG, "1": dict(CFG, SPLIT_K=1), "16": wide}})
    got = [tuned_config("fp8", m, 48, 256, 0, ACT, DEV) for m in (1, 2, 4, 5, 16)]
    assert got == [dict(CFG, SPLIT_K=1), CFG, CFG, wide, wide]
    assert tuned_config("fp8", 17, 48, 256, 0, ACT, DEV) is None  # past the decode products
    assert tuned_config("fp8", 1, 48, 512, 0, ACT, DEV) is None  # no entry for the shape
    assert tuned_config("int4", 1, 48, 256, 0, ACT, DEV) is None
    got[0]["SPLIT_K"] = 99  # callers get copies: the cache is not theirs to change
    assert tuned_config("fp8", 1, 48, 256, 0, ACT, DEV)["SPLIT_K"] == 1


def test_no_table_falls_back_to_the_heuristics() -> None:
    assert gemv_tiles.device_tables("no such device") == {}
    assert fp8_kernels.gemv_config(1, 48, 256, 0, ACT, DEV) == \
        fp8_kernels.gemv_heuristic(1, 48, 256, 0, DEV)
    assert int4_gemm.decode_config(1, 48, 256, 64, ACT, DEV) is None


def test_override_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gemv_tiles.ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="SAGELLM_CUDA_GEMV_CONFIGS=.*no such file"):
        gemv_tiles.device_tables("cpu")


@pytest.mark.parametrize("cfg,msg", [
    ([1, 2], "must be an object"),
    (dict(CFG, GROUP_M=1), r"unknown field\(s\) \['GROUP_M'\]"),
    ({k: v for k, v in CFG.items() if k != "SPLIT_K"}, r"missing \['SPLIT_K'\]"),
    (dict(CFG, SPLIT_K=0), "SPLIT_K must be a positive integer"),
    (dict(CFG, num_stages="3"), "num_stages must be a positive integer"),
    (dict(CFG, num_warps=True), "num_warps must be a positive integer"),
    (dict(CFG, BLOCK_N=48), "BLOCK_N must be a power of two"),
    (dict(CFG, BLOCK_M=8), "BLOCK_M must be 1 or 16"),
    (dict(CFG, BLOCK_M=16, BLOCK_N=8), "BLOCK_N >= 16 for a tl.dot tile"),
    (dict(CFG, BLOCK_K=8), "BLOCK_K >= 16"),
    (dict(CFG, num_warps=32), "num_warps <= 16"),
])
def test_malformed_config_is_refused(cfg: object, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        check_config(cfg, "here")


@pytest.mark.parametrize("doc,msg", [
    ([], "expected an object with a 'tables' object"),
    ({"tables": []}, "expected an object with a 'tables' object"),
    ({"tables": {"N=1": {"1": CFG}}}, "table key 'N=1' is not"),
    ({"tables": {"kind=fp8": {}}}, "must be a non-empty object"),
    ({"tables": {"kind=fp8": {"one": CFG}}}, "row bucket 'one' is not an integer"),
    ({"tables": {"kind=fp8": {"32": CFG}}}, "row bucket 32 must be in 1..16"),
    ({"tables": {"kind=fp8": {"1": dict(CFG, BLOCK_K=3)}}}, r"tables\['kind=fp8'\]\['1'\]: "
                                                             "BLOCK_K must be a power of two"),
])
def test_malformed_table_is_refused(doc: object, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parse_tables(doc, "t.json")


def test_a_broken_file_is_refused_at_lookup(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = _use(tmp_path, monkeypatch, {})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tuned_config("fp8", 1, 48, 256, 0, ACT, DEV)


kernel_mark = pytest.mark.gpu if HAS_CUDA else pytest.mark.interpreted


@kernel_mark
def test_kernels_launch_the_tables_config(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A table entry reaches the launch (a config the kernel refuses proves it is read), and a
    good one gives the same product as the heuristic."""
    from sagellm.quant.fp8_grid import quantize_fp8

    g = torch.Generator().manual_seed(0)
    grid = quantize_fp8((torch.randn(48, 256, generator=g) * 0.05).to(DEV))
    x = torch.randn(1, 256, generator=g).to(DEV, ACT)
    plain = fp8_kernels.fp8_gemv(x, grid.q, grid.scale)
    key = table_key("fp8", 48, 256, 0, ACT)
    _use(tmp_path, monkeypatch, {key: {"1": CFG}})
    torch.testing.assert_close(fp8_kernels.fp8_gemv(x, grid.q, grid.scale), plain,
                               rtol=1e-2, atol=1e-3)
    q, s = quantize_fp8_group(grid)
    _use(tmp_path, monkeypatch, {table_key("fp8", 48, 256, 32, ACT): {"1": CFG}})
    with pytest.raises(ValueError, match="BLOCK_K=64 must divide the scale group 32"):
        fp8_kernels.fp8_gemv(x, q, s)

    w = torch.randint(-2 ** 31, 2 ** 31 - 1, (32, 48), generator=g, dtype=torch.int64).to(
        torch.int32).to(DEV)
    scales = torch.full((4, 48), 0.01, dtype=ACT, device=DEV)
    zeros = torch.full((4, 48), 8.0, dtype=ACT, device=DEV)
    plain = int4_gemm.w4a16_matmul(x, w, scales, zeros, None, 64)
    _use(tmp_path, monkeypatch, {table_key("int4", 48, 256, 64, ACT): {
        "1": dict(CFG, BLOCK_N=1024, BLOCK_K=128, SPLIT_K=3, num_stages=9)}})
    cfg = int4_gemm.decode_config(1, 48, 256, 64, ACT, DEV)
    # 72 KiB a stage (16 word rows x 1,024 outputs, two scale rows): two fit the interpreter's
    # 160 KiB, three an H100/H200's 227 KiB; never the table's nine.
    smem = int4_gemm._smem_per_block(DEV.index)
    per = int4_gemm.stage_bytes(1, 1024, 128, 64)
    assert cfg is not None and cfg["SPLIT_K"] == 3 and 1 < cfg["num_stages"] < 9  # fitted
    assert cfg["num_stages"] * per <= smem - 8 * 1024 < (cfg["num_stages"] + 1) * per
    torch.testing.assert_close(int4_gemm.w4a16_matmul(x, w, scales, zeros, None, 64), plain,
                               rtol=1e-2, atol=1e-3)


def quantize_fp8_group(grid: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The same codes with one scale per 32 inputs (a group layout for the lookup's key)."""
    q = grid.q  # type: ignore[attr-defined]
    return q, grid.scale.expand(q.shape[0], q.shape[1] // 32).contiguous()  # type: ignore[attr-defined]
