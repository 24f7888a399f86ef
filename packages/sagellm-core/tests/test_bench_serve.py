"""The serve workloads: request shapes as ``shared/bench/README.md`` defines them, and the closed
loop counting every streamed token against a stand-in server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sagellm.bench import main as bench_main
from sagellm.bench import serve

sys.path.insert(0, str(Path(__file__).parent))
from soak_fake_server import FakeServer  # noqa: E402


def test_workload_table_matches_the_bench_readme() -> None:
    shapes = {name: (w.concurrency, len(w.requests()[0])) for name, w in serve.WORKLOADS.items()}
    assert shapes == {"serve_c1": (1, 8), "serve_c16": (16, 64), "serve_c64": (64, 256),
                      "serve_mixed": (32, 256)}
    prompts, outs = serve.WORKLOADS["serve_c64"].requests()
    assert {len(p) for p in prompts} == {512} and set(outs) == {256}
    assert prompts[3] == serve.random_prompt(7003, 512)  # seed 7000 + index, as serve_c16


def test_serve_mixed_lengths_and_ids_follow_their_seeds() -> None:
    prompts, outs = serve.mixed()
    rng = np.random.default_rng(8000)
    lens = rng.integers(256, 2049, 256)
    assert [len(p) for p in prompts] == lens.tolist()
    assert prompts[0] == rng.integers(100, 49000, size=int(lens[0])).tolist()  # ids after lengths
    assert outs == np.random.default_rng(8007).integers(32, 513, 256).tolist()
    assert min(lens) >= 256 and max(lens) <= 2048 and 32 <= min(outs) and max(outs) <= 512
    assert serve.mixed() == (prompts, outs)  # fixed seeds: the same work on every engine


def test_closed_loop_counts_every_token_of_mixed_requests() -> None:
    srv = FakeServer()
    prompts = [[5] * n for n in (3, 9, 4, 7, 2)]
    outs = [5, 1, 12, 3, 8]
    r = serve.run_requests(srv.url, 2, prompts, outs)
    assert r["completed"] == 5 and r["n_errors"] == 0
    assert r["requested_tokens"] == sum(outs)
    assert r["input_len"] == [2, 9] and r["output_len"] == [1, 12]
    assert r["out_tok_s"] * r["duration_s"] == pytest.approx(sum(outs))
    assert r["ttft_ms"]["p50"] > 0


def test_bench_runs_a_named_serve_workload(tmp_path: Path) -> None:
    srv = FakeServer()
    out = tmp_path / "b.json"
    rc = bench_main.main(["--serve-url", srv.url, "--workloads", "serve_c1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert rc == 0 and result["serve_c1"]["workload"] == "serve_c1"
    assert result["serve_c1"]["completed"] == 8 and result["serve_c1"]["n_errors"] == 0
    assert result["serve_c1"]["out_tok_s"] * result["serve_c1"]["duration_s"] == pytest.approx(8 * 256)


def test_extra_body_reaches_every_request(tmp_path: Path) -> None:
    seen: list[dict[str, object]] = []
    srv = FakeServer()
    orig = serve.one_request

    def spy(url: str, prompt: list[int], max_tokens: int, model: str | None = None,
            extra: dict[str, object] | None = None) -> dict[str, object]:
        seen.append(dict(extra or {}))
        return orig(url, prompt, max_tokens, model, extra)

    serve.one_request = spy  # type: ignore[assignment]
    try:
        out = tmp_path / "b.json"
        rc = bench_main.main(["--serve-url", srv.url, "--workloads", "serve_c1", "--out", str(out),
                              "--serve-extra-body", '{"logprobs": 5}'])
    finally:
        serve.one_request = orig  # type: ignore[assignment]
    assert rc == 0 and len(seen) == 9 and all(e == {"logprobs": 5} for e in seen)  # warm + 8
    assert json.loads(out.read_text())["serve_c1"]["extra_body"] == {"logprobs": 5}


def test_a_response_whose_first_chunk_holds_every_token_has_no_tpot(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that sends a whole completion in its first chunk (one of vLLM's serve_c16
    responses on the H200 did) counts its tokens but gives no TPOT sample; before, the row died dividing by
    zero."""
    def fake(url: str, prompt: list[int], max_tokens: int, model: str | None = None,
             extra: dict[str, object] | None = None) -> dict[str, object]:
        if len(prompt) == 3:  # one chunk of 4 tokens
            return {"start": 0.0, "end": 0.5, "times": [0.2], "counts": [4]}
        return {"start": 0.0, "end": 1.0, "times": [0.1, 0.2, 0.4], "counts": [1, 1, 2]}

    monkeypatch.setattr(serve, "one_request", fake)
    r = serve.run_requests("http://unused", 1, [[5] * 3, [5] * 6], [4, 4])
    assert r["completed"] == 2 and r["out_tok_s"] * r["duration_s"] == pytest.approx(8)
    # Only the second request's (0.4 - 0.1) s over its 3 tokens after the first chunk.
    assert r["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert r["ttft_ms"]["p50"] == pytest.approx(150.0)


def test_out_lens_are_per_request_in_index_order() -> None:
    srv = FakeServer()
    outs = [5, 1, 12, 3, 8]
    r = serve.run_requests(srv.url, 3, [[5] * 4 for _ in outs], outs)
    assert r["out_lens"] == outs and r["out_tokens"] == sum(outs)


def test_lengths_from_an_earlier_run_replace_the_workloads(tmp_path: Path) -> None:
    """A grammar that ends requests early leaves shorter out_lens; a plain run given them asks
    each request for exactly as many tokens, so the two runs do the same work."""
    srv = FakeServer()
    earlier = tmp_path / "json.json"
    lens = [1 + (7 * i) % 200 for i in range(8)]
    lens[2] = 0  # a failed request keeps the workload's own length
    earlier.write_text(json.dumps({"serve_c1": {"out_lens": lens}}))
    out = tmp_path / "plain.json"
    rc = bench_main.main(["--serve-url", srv.url, "--workloads", "serve_c1", "--out", str(out),
                          "--serve-lengths-from", str(earlier)])
    row = json.loads(out.read_text())["serve_c1"]
    want = [n or 256 for n in lens]
    assert rc == 0 and row["matched_lengths"] is True
    assert row["out_lens"] == want and row["requested_tokens"] == sum(want)


@pytest.mark.parametrize(("row", "match"), [
    ({}, "no serve_c1 row with out_lens"),
    ({"serve_c1": {"out_lens": [3, 4]}}, "has 2 out_lens, the workload 8"),
])
def test_unusable_lengths_files_are_refused(tmp_path: Path, row: dict[str, object],
                                            match: str) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(row))
    with pytest.raises(ValueError, match=match):
        serve.matched_lengths(path, "serve_c1")


@pytest.mark.parametrize("lens", [[3] * 7, [0] + [3] * 7, [True] * 8, [2.5] * 8])
def test_run_workload_refuses_lengths_it_cannot_send(lens: list[object]) -> None:
    with pytest.raises(ValueError, match="8 output lengths of at least 1"):
        serve.run_workload("http://127.0.0.1:9", "serve_c1", None, lens)  # type: ignore[arg-type]
