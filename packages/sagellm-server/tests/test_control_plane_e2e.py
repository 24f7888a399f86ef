"""End to end on localhost: a control plane and three real ``sagellm-server`` engines (the tiny
random Llama with a byte tokenizer), 200 mixed streaming requests with shared prefixes, and one
engine killed with SIGKILL mid-run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import API_KEY, MODEL_NAME, descendants, free_port, wait_gone

from sagellm.testing.tiny_model import make_tiny_llama

SECRET = "registration-secret-for-tests"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NUM_ENGINES, NUM_REQUESTS, CONCURRENCY, NUM_GROUPS = 3, 200, 12, 10
KILL_AFTER = 70  # requests finished before one engine is killed
#: The affinity key is the prompt's first 48 characters: the group's shared system text.
PREFIX_CHARS = 48


@dataclass
class Proc:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    cp: Proc
    engines: list[Proc]
    results: dict[str, Any] = field(default_factory=dict)


def spawn(name: str, tmp: Path, args: list[str], port: int) -> Proc:
    env = {k: v for k, v in os.environ.items() if k not in ("SAGELLM_API_KEY", "SAGELLM_PLUGINS",
                                                           "SAGELLM_CONTROL_PLANE_SECRET")}
    env["TOKENIZERS_PARALLELISM"] = "false"
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    return Proc(name, f"http://127.0.0.1:{port}", proc, log)


def wait_until(what: str, cond: Any, procs: list[Proc], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.log_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            got = cond()
            if got:
                return got
        time.sleep(0.25)
    logs = "\n".join(f"--- {p.name}\n{p.log_text()[-2000:]}" for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def engines_listed(cp: Proc) -> list[dict[str, Any]]:
    r = httpx.get(f"{cp.url}/v1/engines", headers=AUTH, timeout=5)
    r.raise_for_status()
    return r.json()["data"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("control_plane")
    model = make_tiny_llama(tmp / "tiny", tokenizer=True)
    cp_port = free_port()
    cp = spawn("control-plane", tmp, [
        "sagellm_server.control_plane", "--port", str(cp_port), "--api-key", API_KEY,
        "--registration-secret", SECRET, "--drop-after", "3", "--missed-heartbeats", "3",
        "--unreachable-cooldown", "30", "--affinity-prefix-chars", str(PREFIX_CHARS)], cp_port)
    engines = []
    for i in range(NUM_ENGINES):
        port = free_port()
        engines.append(spawn(f"engine-{i}", tmp, [
            "sagellm_server.cli", "--model", str(model), "--served-model-name", MODEL_NAME,
            "--port", str(port), "--api-key", API_KEY, "--log-interval", "0", "--max-num-seqs", "16",
            # One process per engine rather than two: three engines start twice as fast on 2 cores.
            "--engine-in-process",
            "--control-plane", cp.url, "--control-plane-secret", SECRET,
            "--heartbeat-interval", "0.3"], port))
    everyone = [cp, *engines]
    below = []
    try:
        wait_until("three healthy engines",
                   lambda: sum(e["health"] == "healthy" for e in engines_listed(cp)) == NUM_ENGINES,
                   everyone, timeout=180)
        below = [pid for p in everyone for pid in descendants(p.proc.pid)]
        yield Cluster(cp, engines)
    finally:
        for p in everyone:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        for p in everyone:
            try:
                p.proc.wait(20)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(5)
        wait_gone(below, 15)  # nothing left behind, the killed server's helpers included


def test_engines_are_listed_with_capacity_and_reachable_through_it(cluster: Cluster) -> None:
    cp = cluster.cp
    listed = engines_listed(cp)
    assert sorted(e["url"] for e in listed) == sorted(e.url for e in cluster.engines)
    for e in listed:
        assert e["models"] == [MODEL_NAME] and e["backend"] == "cpu" and e["max_model_len"] == 256
        assert e["kv_capacity_tokens"] > 0 and e["max_num_seqs"] == 16
    models = httpx.get(f"{cp.url}/v1/models", headers=AUTH).json()["data"]
    assert [(m["id"], m["num_healthy_engines"]) for m in models] == [(MODEL_NAME, NUM_ENGINES)]
    backends = httpx.get(f"{cp.url}/v1/engines/{listed[0]['id']}/backends", headers=AUTH)
    assert backends.status_code == 200 and backends.json()["serving"]["name"] == "cpu"
    r = httpx.post(f"{cp.url}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert r.headers["x-sagellm-engine"] in {e["id"] for e in listed}
    r = httpx.post(f"{cp.url}/v1/completions", headers=AUTH, json={"model": MODEL_NAME, "prompt": "x",
                                                                   "max_tokens": 10_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"  # the engine's
    assert httpx.post(f"{cp.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x"}).status_code == 401
    assert httpx.post(f"{cp.url}/internal/engines", headers=AUTH, json={}).status_code == 401


def request_body(i: int) -> tuple[int, str, dict[str, Any]]:
    group = (i * 7) % NUM_GROUPS
    system = f"Group {group:02d} shares this system prompt for its cache. "[:PREFIX_CHARS].ljust(PREFIX_CHARS, ".")
    question = f"Question {i}: what comes next?"
    # Streams long enough that some are mid-way when the engine is killed.
    common = {"model": MODEL_NAME, "max_tokens": 6 + (i % 5) * 8, "ignore_eos": True, "stream": True}
    if i % 2:
        return group, "/v1/chat/completions", {**common, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": question}]}
    return group, "/v1/completions", {**common, "prompt": system + " " + question}


@dataclass
class Outcome:
    group: int
    engine: str | None = None
    started: bool = False
    ok: bool = False
    error: str | None = None
    after_kill: bool = False


async def one(client: httpx.AsyncClient, url: str, i: int, killed: asyncio.Event) -> Outcome:
    group, path, body = request_body(i)
    out = Outcome(group, after_kill=killed.is_set())
    try:
        async with client.stream("POST", url + path, json=body, headers=AUTH) as r:
            out.engine = r.headers.get("x-sagellm-engine")
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    out.ok = out.error is None
                    break
                event = json.loads(data)
                if "error" in event:
                    out.error = event["error"]["message"]
                else:
                    out.started = True
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def workload(cp_url: str, kill: Any) -> list[Outcome]:
    killed = asyncio.Event()
    sem = asyncio.Semaphore(CONCURRENCY)
    done = 0

    async def run(i: int) -> Outcome:
        nonlocal done
        async with sem:
            out = await one(client, cp_url, i, killed)
        done += 1
        if done == KILL_AFTER:
            kill()
            killed.set()
        return out

    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(run(i) for i in range(NUM_REQUESTS)))


@pytest.mark.slow
def test_200_streams_with_affinity_survive_an_engine_killed_mid_run(cluster: Cluster) -> None:
    cp = cluster.cp
    ids = {e["url"]: e["id"] for e in engines_listed(cp)}
    victim: dict[str, Any] = {}

    def kill() -> None:
        # The engine with most placements so far: it certainly has streams in flight.
        busiest = max(engines_listed(cp), key=lambda e: e["num_routed"])
        proc = next(p for p in cluster.engines if p.url == busiest["url"])
        victim.update(id=busiest["id"], proc=proc, t=time.monotonic())
        proc.proc.send_signal(signal.SIGKILL)

    t0 = time.monotonic()
    outcomes = asyncio.run(workload(cp.url, kill))
    elapsed = time.monotonic() - t0
    assert victim, "the kill did not happen"

    failed = [o for o in outcomes if not o.ok]
    never_started = [o for o in failed if not o.started]
    assert never_started == [], f"requests failed before any output: {[o.error for o in never_started][:5]}"
    # Only streams that were running on the killed engine may fail (with an error event).
    assert all(o.engine == victim["id"] for o in failed), [(o.engine, o.error) for o in failed]
    assert len(failed) <= CONCURRENCY
    assert not any(o.engine == victim["id"] for o in outcomes if o.after_kill and o.ok)

    # The dead engine leaves the list (down after 3 missed heartbeats, dropped after 3 s).
    wait_until("the killed engine to leave the list",
               lambda: victim["id"] not in {e["id"] for e in engines_listed(cp)}, [cp], timeout=15)
    survivors = engines_listed(cp)
    assert len(survivors) == NUM_ENGINES - 1 and all(e["health"] == "healthy" for e in survivors)

    # Prefix affinity: per group, the share of its requests that met the group's usual engine
    # (separately before and after the kill, as the killed engine's groups move).
    def consistency(sel: list[Outcome]) -> float:
        by_group: dict[int, Counter[str]] = defaultdict(Counter)
        for o in sel:
            if o.engine:
                by_group[o.group][o.engine] += 1
        total = sum(sum(c.values()) for c in by_group.values())
        return sum(c.most_common(1)[0][1] for c in by_group.values()) / max(1, total)

    before = consistency([o for o in outcomes if not o.after_kill])
    after = consistency([o for o in outcomes if o.after_kill])
    page = httpx.get(f"{cp.url}/metrics", headers=AUTH, timeout=10).text
    routed: Counter[str] = Counter()
    retries = 0.0
    engine_prefix_hits: dict[str, float] = {}
    for fam in text_string_to_metric_families(page):
        for s in fam.samples:
            if s.name == "sagellm:router_requests_total":
                routed[s.labels["placement"]] += s.value
            elif s.name == "sagellm:router_retries_total":
                retries += s.value
            elif ("prefix" in s.name or "cache_hit" in s.name) and "engine" in s.labels:
                engine_prefix_hits[f"{s.name}{{engine={s.labels['engine']}}}"] = s.value
    affinity_rate = routed["affinity"] / max(1, sum(routed.values()))
    per_engine = Counter(o.engine for o in outcomes)
    report = {
        "requests": NUM_REQUESTS, "seconds": round(elapsed, 1), "failed_after_output": len(failed),
        "retries": retries, "placements": dict(routed), "affinity_placement_rate": round(affinity_rate, 3),
        "group_consistency_before_kill": round(before, 3), "group_consistency_after_kill": round(after, 3),
        "per_engine": dict(per_engine), "killed": victim["id"],
        "engine_prefix_cache_metrics": engine_prefix_hits or "not exposed by the engines' /metrics",
    }
    print("control plane e2e:", json.dumps(report))
    assert before >= 0.8 and after >= 0.8, report
    assert affinity_rate >= 0.7, report
    assert len(per_engine) == NUM_ENGINES, report  # every engine served some
    assert set(ids.values()) >= set(per_engine) - {None}
    # Aggregated metrics carry the survivors' samples, labelled by engine.
    labelled = {s.labels.get("engine") for fam in text_string_to_metric_families(page)
                for s in fam.samples if s.name == "sagellm:generation_tokens_total"}
    assert labelled == {e["id"] for e in survivors}, labelled


def test_a_gracefully_stopped_engine_deregisters_at_once(cluster: Cluster) -> None:
    cp = cluster.cp
    listed = engines_listed(cp)
    assert listed, "no engine left"
    leaving = next(p for p in cluster.engines if p.url == listed[0]["url"])
    t0 = time.monotonic()
    leaving.proc.send_signal(signal.SIGTERM)
    wait_until("the stopped engine to leave the list",
               lambda: listed[0]["id"] not in {e["id"] for e in engines_listed(cp)}, [cp], timeout=10)
    # Well before the 3 s it would take to be dropped for silence.
    assert time.monotonic() - t0 < 2.5
    assert leaving.proc.wait(30) == 0
    assert "deregistered from the control plane" in leaving.log_text()
