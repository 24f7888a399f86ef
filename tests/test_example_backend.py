"""The example out-of-tree backend, installed by pip from its directory, is discovered and used.

pip installs ``examples/sagellm-example-backend`` into a fresh ``--target`` directory (no network,
no build isolation: it needs only setuptools); the checks then run in subprocesses whose
``PYTHONPATH`` holds that directory, so this test process never sees the plugin.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sagellm.testing import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "sagellm-example-backend"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("example-install")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target), str(src)],
                   check=True, timeout=120)
    assert (target / "sagellm_example_backend-0.1.0.dist-info" / "entry_points.txt").exists()
    env = {k: v for k, v in os.environ.items() if k != "SAGELLM_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), tokenizer=True)


def _run(env: dict[str, str], *args: str, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_sagellm_backends_lists_the_example(installed: dict[str, str]) -> None:
    out = _run(installed, "-m", "sagellm.cli", "backends", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    example = next(b for b in report["backends"] if b["name"] == "example")
    assert example["distribution"] == "sagellm-example-backend" and example["available"]
    assert report["auto"] == "cpu"  # negative priority: installing it does not hijack auto


def test_generate_runs_through_the_example(installed: dict[str, str], tiny_model: Path) -> None:
    out = _run(installed, "-m", "sagellm.cli", "generate", "--backend", "example", "--model",
               str(tiny_model), "--max-tokens", "4", "-v", "hello")
    assert out.returncode == 0, out.stderr
    assert "backend example (example (cpu))" in out.stderr  # the engine's start-up line
    assert "example backend serving" in out.stderr  # its sagellm_engine_started hook ran


def test_conformance_suite_passes_for_the_example(installed: dict[str, str]) -> None:
    # The two-rank comm test is left out here for time: the example uses core's
    # TorchDistributedComm over gloo, which the CPU backend's own suite runs with two ranks.
    out = _run(installed, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not two_ranks",
               str(EXAMPLE / "tests"), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("sagellm_server") is None,
                    reason="sagellm-server is not installed")
def test_server_discovers_and_serves_with_the_example(installed: dict[str, str],
                                                      tiny_model: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sagellm_server.cli", "--backend", "example", "--model",
         str(tiny_model), "--port", str(port), "--log-interval", "0", "--log-level", "warning"],
        env=installed, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, f"server exited: {proc.stdout.read() if proc.stdout else ''}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/v1/backends", timeout=10) as r:
            backends = json.load(r)
        assert "example" in [b["name"] for b in backends["backends"]]
        assert backends["serving"]["name"] == "example"
        req = urllib.request.Request(
            f"{base}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": tiny_model.name, "prompt": "hello", "max_tokens": 4,
                             "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.load(r)
        assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["text"] is not None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
