"""The soak's own logic: SSE accounting, outcome classes, percentiles, /metrics, criteria; then
whole levels against a fake server (``soak_fake_server.py``) that misbehaves on request."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.bench import main as bench_main
from sagellm.bench import soak
from sagellm.bench.soak_client import SseCounter, count_tokens
from sagellm.bench.soak_probe import growth, kv_leak, parse_prometheus, restarts
from sagellm.bench.soak_requests import Mix, bad_body, bad_requests, plan
from sagellm.bench.stats import percentile, summary
from sagellm.engine.block_manager import BlockManager
from sagellm.engine.sequence import SequenceState
from sagellm.protocols import KVCacheSpec
from sagellm.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from soak_fake_server import FakeServer, FakeState  # noqa: E402

CHUNK = (b'data: {"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":'
         b'[{"index":0,"text":"ab","logprobs":null,"finish_reason":null,"token_ids":[5,6,7]}]}\n\n')


# -- SSE accounting ---------------------------------------------------------------------------


def test_sse_counter_splits_across_reads_and_counts_ids() -> None:
    sse = SseCounter()
    data = CHUNK + CHUNK.replace(b"[5,6,7]", b"[9]") + b"data: [DONE]\n\n"
    for i in range(0, len(data), 7):  # events cut at arbitrary byte boundaries
        sse.feed(data[i:i + 7], float(i))
    assert (sse.tokens, sse.events, sse.done, sse.error) == (4, 3, True, None)
    assert sse.first is not None


def test_count_tokens_layouts() -> None:
    assert count_tokens(CHUNK[6:-2]) == 3
    assert count_tokens(b'{"id":"c","choices":[{"delta":{"role":"assistant","content":""}}]}') == 0
    assert count_tokens(b'{"id":"c","choices":[{"token_ids":[]}]}') == 0
    assert count_tokens(b'{"choices":[],"usage":{"completion_tokens":3}}') == 0
    assert count_tokens(b'{"choices":[{"token_ids":[1, 2]}]}') == 2  # other key order: decoded
    assert count_tokens(b'{"error":{"message":"engine died"}}') is None
    assert count_tokens(b"not json") is None


def test_error_event_is_kept_and_tokens_after_done_ignored() -> None:
    sse = SseCounter()
    sse.feed(CHUNK + b'data: {"error": {"message": "x"}}\n\ndata: [DONE]\n\n' + CHUNK, 0.0)
    assert sse.tokens == 3 and sse.done and sse.error is not None and "x" in sse.error


def test_percentiles() -> None:
    xs = [float(x) for x in range(1, 101)]
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile([3.0], 90) == 3.0
    assert math.isnan(percentile([], 50))
    assert summary([1.0, 3.0])["mean"] == 2.0


# -- metrics and criteria -----------------------------------------------------------------------


def test_parse_prometheus_sums_label_sets() -> None:
    m = parse_prometheus("# HELP x y\n# TYPE x gauge\n"
                         'sagellm:engine_rss_bytes{model_name="m",rank="0"} 10\n'
                         'sagellm:engine_rss_bytes{model_name="m",rank="1"} 5.5\n'
                         "sagellm:engine_restarts_total 2.0\n"
                         'sagellm:num_kv_blocks{model_name="a b}c"} 100\n'
                         "sagellm:num_free_kv_blocks 97\ngarbage\n")
    assert m["sagellm:engine_rss_bytes"] == 15.5
    assert restarts(m) == 2.0 and kv_leak(m) == 3.0
    assert kv_leak({}) is None and restarts({}) is None
    assert growth(100.0, 101.0) == pytest.approx(0.01) and growth(None, 1.0) is None


def test_prefix_cached_blocks_count_as_free() -> None:
    """The leak figure (blocks - free on an idle server) relies on this: blocks held only by the
    prefix cache are free for allocation, so they are not counted as leaked."""
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, block_size=4, dtype=torch.float32)
    bm = BlockManager(TorchKVBackend(spec, 8, torch.device("cpu")), 4, enable_caching=True)
    s = SequenceState("a", list(range(1, 13)), SamplingParams())
    bm.allocate(s, 12)
    s.num_computed_tokens = 12
    bm.register_computed_blocks(s)
    bm.free(s)
    assert bm.num_cached_blocks == 3 and bm.num_free_blocks == bm.num_blocks


def _load(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"client_errors": 0, "completed": 5,
                               "bad_requests": {"sent": 4, "not_4xx": 0}}
    base.update(kw)
    return base


GOOD = {"sagellm:engine_alive": 1.0, "sagellm:engine_restarts_total": 0.0,
        "sagellm:num_kv_blocks": 10.0, "sagellm:num_free_kv_blocks": 10.0,
        "sagellm:server_rss_bytes": 1000.0, "sagellm:engine_rss_bytes": 2000.0}


def test_judge_pass_fail_unknown() -> None:
    c = soak.judge(_load(), GOOD, GOOD, idle=True)
    assert all(v["pass"] is True for v in c.values()) and soak.verdict(c) is True
    after = {**GOOD, "sagellm:engine_restarts_total": 1.0, "sagellm:num_free_kv_blocks": 8.0,
             "sagellm:engine_rss_bytes": 2030.0}
    c = soak.judge(_load(client_errors=2), GOOD, after, idle=True)
    assert {k for k, v in c.items() if v["pass"] is False} == {
        "engine_deaths", "client_errors", "kv_blocks_leaked", "rss_growth"}
    assert c["kv_blocks_leaked"]["value"] == 2 and c["engine_deaths"]["value"] == 1
    bare = {k: v for k, v in GOOD.items() if "rss" not in k and "restarts" not in k}
    c = soak.judge(_load(), bare, bare, idle=True)
    assert c["engine_deaths"]["pass"] is None and "unknown" in c["engine_deaths"]["note"]
    assert c["rss_growth"]["pass"] is None and soak.verdict(c) is None
    dead = {**bare, "sagellm:engine_alive": 0.0}
    c = soak.judge(_load(), bare, dead, idle=False)
    assert c["engine_deaths"]["pass"] is False and c["engine_alive"]["pass"] is False
    assert c["kv_blocks_leaked"]["pass"] is False and soak.verdict(c) is False
    assert soak.judge(_load(completed=0), GOOD, GOOD, True)["completed_any"]["pass"] is False


# -- the request mix --------------------------------------------------------------------------


def test_plan_is_deterministic_and_fits_the_context() -> None:
    mix = Mix(model="m", max_model_len=600, prompt_len=(64, 1024), max_tokens=(16, 256),
              disconnect=0.3, bad=0.1, chat=0.2, seed=3)
    reqs = [plan(mix, i) for i in range(2000)]
    assert reqs[:50] == [plan(mix, i) for i in range(50)]
    good = [r for r in reqs if r is not None]
    assert 0.07 < 1 - len(good) / len(reqs) < 0.13
    assert 0.25 < sum(r.disconnect_after is not None for r in good) / len(good) < 0.35
    assert 0.15 < sum(r.path.endswith("chat/completions") for r in good) / len(good) < 0.25
    for r in good:
        body = json.loads(r.body)
        assert body["max_tokens"] == r.max_tokens and body["ignore_eos"] and body["stream"]
        assert r.disconnect_after is None or 0 <= r.disconnect_after < r.max_tokens
        if "prompt" in body:
            assert len(body["prompt"]) + r.max_tokens <= 600


def test_bad_requests_cover_the_hostile_kinds() -> None:
    bad = {b.kind: b for b in bad_requests("m", 100)}
    for kind in ("invalid_json", "deeply_nested_json", "lone_surrogate_prompt", "top_k_huge",
                 "seed_huge", "negative_max_tokens", "prompt_too_long", "unknown_model",
                 "huge_chat_template", "chat_bad_role"):
        assert kind in bad, kind
    assert b"\\ud800" in bad["lone_surrogate_prompt"].body
    assert len(json.loads(bad["prompt_too_long"].body)["prompt"]) > 100
    b = bad["seed_huge"]
    assert json.loads(bad_body(b, 1))["stream"] is True and bad_body(b, 0) == b.body
    assert bad_body(bad["invalid_json"], 1) == bad["invalid_json"].body


# -- whole soaks against the fake server --------------------------------------------------------


def _run(tmp_path: Path, url: str, *extra: str) -> tuple[int, dict[str, object]]:
    out = tmp_path / "soak.json"
    rc = bench_main.main(["--workloads", "soak", "--serve-url", url, "--out", str(out),
                          "--soak-clients", "2,4", "--soak-seconds", "1", "--soak-warmup-seconds", "0.5",
                          "--soak-warmup-slice-seconds", "0.5", "--soak-warmup-max-seconds", "0.5",
                          "--soak-prompt-len", "4-16", "--soak-max-tokens", "2-6",
                          "--soak-idle-timeout", "3", *extra])
    return rc, json.loads(out.read_text())["soak"]


def test_clean_soak_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = FakeServer()
    rc, result = _run(tmp_path, srv.url, "--soak-bad", "0", "--soak-disconnect", "0.5", "--soak-procs", "2")
    assert rc == 0 and result["pass"] is True, result
    levels = result["levels"]
    assert [lv["clients"] for lv in levels] == [2, 4] and result["warmup"]["clients"] == 4
    for lv in levels:
        assert lv["completed"] > 0 and lv["disconnected"] > 0 and lv["client_errors"] == 0
        assert lv["out_tok_s"] > 0 and lv["ttft_ms"]["p50"] > 0
    assert levels[1]["next_index"] > levels[0]["next_index"] > result["warmup"]["next_index"]
    table = capsys.readouterr().out
    assert "c2" in table and "c4" in table and "[warm]" in table and "yes" in table


def test_faulty_server_fails_each_criterion(tmp_path: Path) -> None:
    state = FakeState(crash_on_bad_json=True, short_every=3, error_event_every=5, leak_blocks=2,
                      rss_step=10_000_000, restarts_step=0.5)
    rc, result = _run(tmp_path, FakeServer(state).url, "--soak-bad", "0.5", "--soak-procs", "1",
                      "--soak-idle-timeout", "0.5")
    assert rc == 1 and result["pass"] is False
    lv = result["levels"][-1]
    failed = {k for k, c in lv["criteria"].items() if c["pass"] is False}
    assert failed == {"engine_deaths", "client_errors", "bad_requests_4xx", "kv_blocks_leaked",
                      "rss_growth"}, lv["criteria"]
    assert {"token_count", "error_event"} <= set(lv["outcomes"])
    kinds = {s["kind"] for s in lv["error_samples"]}
    assert kinds <= {"token_count", "error_event"}
    by_kind = {k: v for level in [result["warmup"], *result["levels"]]
               for k, v in level["bad_requests"]["by_kind"].items()}
    assert "4xx" in by_kind["negative_max_tokens"] and "http_500" in by_kind["invalid_json"]


def test_absent_metrics_are_unknown_and_other_targets_refused(tmp_path: Path) -> None:
    rc, result = _run(tmp_path, FakeServer(FakeState(export_optional=False)).url, "--soak-bad", "0")
    assert rc == 0 and result["pass"] is None
    cr = result["levels"][0]["criteria"]
    assert cr["engine_deaths"]["pass"] is None and cr["rss_growth"]["pass"] is None
    with pytest.raises(ValueError, match="loopback"):
        _run(tmp_path, "http://10.1.2.3:8000")


def _warm_only(tmp_path: Path, state: FakeState, *extra: str) -> tuple[dict[str, object], str]:
    """A soak of one short level whose warm-up runs 0.5 s slices until steady (or the cap)."""
    rc, result = _run(tmp_path, FakeServer(state).url, "--soak-clients", "2", "--soak-bad", "0",
                      "--soak-seconds", "0.3", "--soak-warmup-steady", "0.002",
                      "--soak-warmup-max-seconds", "10", *extra)
    return result["warmup"], json.dumps(result["warmup"]["slices"])  # type: ignore[index]


def test_warmup_runs_until_rss_is_steady(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Engine RSS +5%/s for the first 1.2 s of streaming: slices 1-3 grow, then it is flat.
    warm, why = _warm_only(tmp_path, FakeState(engine_rss_per_s=10_000_000, engine_rss_grow_s=1.2))
    slices = warm["slices"]
    assert warm["stop"] == "steady" and warm["steady"] is True, why
    assert 2 <= warm["slices_run"] == len(slices) < 20, why  # not the 10 s cap
    assert slices[0]["growth"]["engine"] > 0.002 and slices[-1]["growth"]["engine"] < 0.002, why
    assert warm["total_s"] == pytest.approx(0.5 * len(slices))
    assert slices[-1]["rss_bytes"]["engine"] > 200_000_000
    assert f"steady after {warm['total_s']:g} s" in capsys.readouterr().out


def test_warmup_honours_the_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    warm, why = _warm_only(tmp_path, FakeState(engine_rss_per_s=10_000_000, engine_rss_grow_s=1e9),
                           "--soak-warmup-max-seconds", "1.2")
    assert warm["stop"] == "cap" and warm["steady"] is False, why
    # 0.5 + 0.5 + the 0.2 s left of the cap.
    assert [s["seconds"] for s in warm["slices"]] == pytest.approx([0.5, 0.5, 0.2]), why
    assert warm["total_s"] == pytest.approx(1.2)
    assert "cap reached (1.2 s)" in capsys.readouterr().out


def test_warmup_without_rss_gauges_is_fixed(tmp_path: Path) -> None:
    warm, why = _warm_only(tmp_path, FakeState(export_optional=False))
    assert warm["stop"] == "fixed" and warm["slices_run"] == 1 and "not exported" in warm["note"], why
