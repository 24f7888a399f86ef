"""``benchmarks/tune_gemv.py`` on the CPU: the candidate filter, the search on a fake timing
function (the fastest exact candidate wins; an inexact or refused one never does; the budget
keeps every entry its heuristic), the JSON writer (loads back, merges), and the smoke mode end
to end through the kernels. The GPU run itself (timings on an H200) is the lead's: see the
script's docstring."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from sagellm_cuda import gemv_tiles


@pytest.fixture(scope="module")
def tg(load_benchmark):  # type: ignore[no-untyped-def]
    return load_benchmark("tune_gemv")


def test_candidates_fit_the_kernels_and_the_table(tg) -> None:  # type: ignore[no-untyped-def]
    for kind in ("fp8", "int4"):
        for name, (n, k) in tg.SHAPES.items():
            for m in tg.ROWS:
                e = tg.Entry(kind, name, n, k, 0 if kind == "fp8" else 128, m)
                cands = tg.candidates(e, tg.TILES[kind], 132)
                assert cands, e
                assert len({tg.freeze(c) for c in cands}) == len(cands), "no duplicates"
                for c in cands:
                    gemv_tiles.check_config(c, str(e))
                    assert tg.fits(e, c)
                    assert m <= 2 or c["BLOCK_M"] == 16  # one row a program re-reads the weight
    total = sum(len(tg.candidates(e, tg.TILES[e.kind], 132))
                for e in tg.entries_for(["fp8", "int4"], tg.SHAPES, tg.ROWS, 0, 128))
    assert total < 1500, total  # the 4-minute budget on an H200


def test_split_options(tg) -> None:  # type: ignore[no-untyped-def]
    o = tg.Entry("fp8", "o", 4096, 4096, 0, 1)
    s = tg.split_options(o, 1, 32, 128, 132)
    assert s[0] == 1 and len(s) > 2
    for split in s[1:]:
        per = -(-32 // split)
        assert per >= 2 and 128 * split <= tg.WAVES * 132
    head = tg.Entry("fp8", "lm_head", 128256, 4096, 0, 1)
    assert tg.split_options(head, 1, 8, 128, 132) == [1]  # 16032 tiles fill the GPU unsplit
    assert tg.split_options(tg.Entry("int4", "t", 64, 128, 128, 1), 1, 64, 128, 8) == [1]


def test_fits_refuses_a_k_tile_across_fp8_groups(tg) -> None:  # type: ignore[no-untyped-def]
    e = tg.Entry("fp8", "t", 256, 1024, 128, 4)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, SPLIT_K=1, num_warps=4, num_stages=2)
    assert not tg.fits(e, cfg) and tg.fits(e, dict(cfg, BLOCK_K=128))
    assert not tg.fits(e, dict(cfg, BLOCK_N=8, BLOCK_K=128))
    assert tg.fits(tg.Entry("int4", "t", 256, 1024, 128, 4), cfg)  # int4 gathers per element


def _cfg(bn: int, split: int = 1) -> dict[str, int]:
    return dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=64, SPLIT_K=split, num_warps=4, num_stages=2)


def test_tune_keeps_the_fastest_exact_candidate(tg) -> None:  # type: ignore[no-untyped-def]
    e = tg.Entry("fp8", "t", 64, 256, 0, 1)
    heur, fast, wrong, broken = _cfg(32), _cfg(16, 2), _cfg(8), _cfg(64)
    speed = {tg.freeze(heur): 10.0, tg.freeze(fast): 6.0, tg.freeze(wrong): 1.0,
             tg.freeze(broken): 0.5}

    def time_us(entry, cfg):  # type: ignore[no-untyped-def]
        if cfg == broken:
            raise RuntimeError("out of resources")
        return speed[tg.freeze(cfg)]

    def check(entry, cfg):  # type: ignore[no-untyped-def]
        if cfg == broken:
            raise RuntimeError("out of resources")
        return 0.5 if cfg == wrong else 1e-6

    res = tg.tune([e], {e: heur}, {e: [heur, wrong, broken, fast]}, time_us, check, 1e-4,
                  time.perf_counter() + 60)[e]
    assert (res.heuristic_us, res.best_us, res.best, res.timed) == (10.0, 6.0, fast, 1)
    assert len(res.failed) == 2 and "rel err 5.00e-01" in res.failed[0]
    assert "RuntimeError" in res.failed[1]


def test_tune_past_the_budget_keeps_the_heuristic(tg) -> None:  # type: ignore[no-untyped-def]
    entries = [tg.Entry("int4", "t", 64, 256, 64, m) for m in (1, 2)]
    heur = {e: _cfg(32) for e in entries}
    res = tg.tune(entries, heur, {e: [_cfg(16)] for e in entries}, lambda e, c: 3.0,
                  lambda e, c: 0.0, 1e-4, deadline=0.0)
    assert all(r.best == _cfg(32) and r.best_us == 3.0 and r.timed == 0 for r in res.values())


def test_inexact_heuristic_is_reported(tg, capsys) -> None:  # type: ignore[no-untyped-def]
    e = tg.Entry("fp8", "t", 64, 256, 0, 1)
    res = tg.tune([e], {e: _cfg(32)}, {e: []}, lambda e, c: 3.0, lambda e, c: 1.0, 1e-4,
                  time.perf_counter() + 60)[e]
    assert res.failed and res.failed[0].startswith("HEURISTIC")
    assert "off the reference" in capsys.readouterr().err


def _results(tg, gbps_us: float = 4.0):  # type: ignore[no-untyped-def]
    e1 = tg.Entry("fp8", "o", 4096, 4096, 0, 1)
    e4 = tg.Entry("fp8", "o", 4096, 4096, 0, 4)
    return {e1: tg.Result(8.0, gbps_us, _cfg(16)), e4: tg.Result(9.0, 9.0, _cfg(32))}


def test_write_table_loads_back_and_merges(tg, tmp_path: Path,  # type: ignore[no-untyped-def]
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    other = gemv_tiles.table_key("int4", 8, 64, 32, "bfloat16")
    (tmp_path / "nvidia_h200.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "tables": {other: {"1": _cfg(8)}}}))
    doc = tg.table_doc("NVIDIA H200", torch.bfloat16, _results(tg))
    key = gemv_tiles.table_key("fp8", 4096, 4096, 0, torch.bfloat16)
    assert doc["measured"][key]["1"]["GBps"] == pytest.approx((4096 * 4096 + 4 * 4096) / 4e3,
                                                              abs=0.1)
    path = tg.write_table(tmp_path, doc, merge=True)
    assert path == tmp_path / "nvidia_h200.json"
    tables = gemv_tiles.load_tables(path)
    assert set(tables) == {key, other}, "another shape's table is kept"
    assert tables[key] == {1: _cfg(16), 4: _cfg(32)}
    solo = tg.write_table(tmp_path / "run.json", doc, merge=False)
    assert set(gemv_tiles.load_tables(solo)) == {key}
    (tmp_path / "nvidia_h200.json").write_text(json.dumps({"tables": {"bad": {}}}))
    with pytest.raises(ValueError, match="table key 'bad'"):
        tg.write_table(tmp_path, doc, merge=True)  # never merges into a file it cannot read
    monkeypatch.setenv(gemv_tiles.ENV_VAR, str(solo))
    gemv_tiles.clear_cache()
    try:
        assert gemv_tiles.tuned_config("fp8", 3, 4096, 4096, 0, torch.bfloat16,
                                       torch.device("cpu")) == _cfg(32)
    finally:
        gemv_tiles.clear_cache()


def test_report_prints_gbps(tg, capsys) -> None:  # type: ignore[no-untyped-def]
    tg.report(_results(tg))
    out = capsys.readouterr().out
    assert "GB/s" in out and f" {(4096 * 4096 + 4 * 4096) / 4e3:.0f} " in out  # 16.8 MB, 4 us


@pytest.mark.parametrize("argv,msg", [
    ([], "--out FILE and/or --write-to DIR"),
    (["--out", "x.json", "--kinds", "fp8,int8"], "--kinds: unknown \\['int8'\\]"),
    (["--out", "x.json", "--fp8-group", "24"], "--fp8-group must be 0 or a multiple of 16"),
    (["--out", "x.json", "--int4-group", "0"], "--int4-group must be a positive multiple"),
])
def test_main_refuses_bad_arguments(tg, argv: list[str], msg: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit, match=msg):
        tg.main(argv)


def test_main_needs_cuda_or_smoke(tg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--shapes: unknown"):
            tg.main(["--out", str(tmp_path / "t.json"), "--shapes", "qkv,nope"])
        return
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        tg.main(["--out", str(tmp_path / "t.json")])


def test_entries_refuse_a_group_that_does_not_divide_k(tg) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit, match="--fp8-group 96 does not divide K=4096 of o"):
        tg.entries_for(["fp8"], {"o": (4096, 4096)}, [1], 96, 128)


@pytest.mark.interpreted
@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode is the CPU CI's (Triton's "
                    "interpreter is chosen when the kernels are defined)")
def test_smoke_writes_tables_the_kernels_read(tg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    doc = tg.main(["--smoke", "--out", str(tmp_path / "run.json"), "--write-to", str(tmp_path)])
    tables = gemv_tiles.load_tables(tmp_path / "cpu.json")
    assert tables == gemv_tiles.load_tables(tmp_path / "run.json")
    assert sorted(tables) == sorted(doc["tables"])
    kinds = {k.split(",")[0] for k in tables}
    assert kinds == {"kind=fp8", "kind=int4"}
    for buckets in tables.values():
        assert sorted(buckets) == tg.SMOKE_ROWS


def test_a_failing_heuristic_is_beaten_by_any_candidate(tg, capsys) -> None:  # type: ignore[no-untyped-def]
    e = tg.Entry("int4", "t", 64, 256, 64, 1)

    def time_us(entry, cfg):  # type: ignore[no-untyped-def]
        if cfg == _cfg(32):
            raise RuntimeError("out of resources")
        return 7.0

    res = tg.tune([e], {e: _cfg(32)}, {e: [_cfg(16)]}, time_us, lambda e, c: 0.0, 1e-4,
                  time.perf_counter() + 60)[e]
    assert res.best == _cfg(16) and res.best_us == 7.0
    assert "heuristic launch failed" in capsys.readouterr().err
