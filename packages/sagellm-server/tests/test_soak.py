"""A scaled-down soak (``sagellm bench --workloads soak``) against a real server on the CPU.

The full soak (64-256 clients, 3 minutes a level) runs on a GPU (``benchmarks/gpu_soak.sh`` in
sagellm-core); this one keeps its shape at CI size: a fixed 8-second warm-up (capped at its
minimum, so not run on until RSS is steady: CI time) and one 25-second level of 8 streaming
clients, 30% of requests hanging up mid-stream and 40% hostile (so all kinds of
``soak_requests.bad_requests`` are sent), on the embedded SmolLM2. It asserts every criterion of
a level (``sagellm.bench.soak``); where a metric the criteria need is not exported yet, the
criterion is unknown and the test fails on it too, on purpose.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import API_KEY, Server, serving, start_server

from sagellm.bench import main as bench_main


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(start_server(tmp_path_factory.mktemp("soak"), "--max-num-seqs", "16",
                              "--max-model-len", "2048"), returncodes=(0, -signal.SIGTERM)) as srv:
        yield srv


@pytest.mark.slow
def test_soak_small(soak_server: Server, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    rc = bench_main.main([
        "--workloads", "soak", "--serve-url", soak_server.url, "--api-key", API_KEY,
        "--out", str(out), "--soak-clients", "8", "--soak-seconds", "25",
        "--soak-warmup-seconds", "8", "--soak-warmup-max-seconds", "8",
        "--soak-disconnect", "0.3", "--soak-bad", "0.4",
        "--soak-chat", "0.2", "--soak-prompt-len", "16-256", "--soak-max-tokens", "8-48",
        "--soak-drain-seconds", "60", "--soak-read-timeout", "60", "--soak-idle-timeout", "30",
        "--soak-procs", "1"])
    result = json.loads(out.read_text())["soak"]
    level = result["levels"][0]
    sent = {k for lv in (result["warmup"], level) for k in lv["bad_requests"]["by_kind"]}
    report = json.dumps({"criteria": level["criteria"], "outcomes": level["outcomes"],
                         "errors": level["error_samples"][:5],
                         "bad": level["bad_requests"]["failure_samples"][:10]}, indent=1)
    failed = sorted(k for k, c in level["criteria"].items() if c["pass"] is not True)
    assert not failed and rc == 0, f"soak criteria not met: {failed}\n{report}"
    # And the soak did what it says: streams completed, hung up, nearly every hostile kind sent.
    assert level["completed"] >= 8 and level["disconnected"] >= 1, report
    assert len(sent) >= 15, sent
