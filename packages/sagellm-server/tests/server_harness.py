"""Start and stop a real ``sagellm-server`` process on a free port (used by the fixtures)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

API_KEY = "test-key-0123456789"
MODEL_NAME = "smol"


def serving_backend() -> str:
    """The backend the test servers run on: ``--backend`` in ``SAGELLM_TEST_SERVER_ARGS`` (the
    device machine's runs), else the CPU."""
    args = shlex.split(os.environ.get("SAGELLM_TEST_SERVER_ARGS", ""))
    for i, a in enumerate(args):
        if a == "--backend" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--backend="):
            return a.split("=", 1)[1]
    return "cpu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_fake_plugin(root: Path) -> None:
    """A throw-away distribution ``fakebackend`` 0.1 registering an unavailable platform."""
    (root / "fakebackend_plugin.py").write_text(textwrap.dedent('''
        from __future__ import annotations

        import torch

        import sagellm
        from sagellm.protocols import Availability, Capabilities, MemoryInfo, Platform


        class FakePlatform(Platform):
            name = "fakehw"
            device_type = "cpu"

            @classmethod
            def is_available(cls) -> Availability:
                return Availability.no("no fake accelerator is attached")

            @classmethod
            def capabilities(cls) -> Capabilities:
                return Capabilities(dtypes=(torch.float32,), default_dtype=torch.float32, priority=5)

            def memory_info(self) -> MemoryInfo:
                return MemoryInfo(0, 0)

            def make_kv_backend(self, spec, num_blocks):
                raise NotImplementedError

            def make_attention_backend(self):
                raise NotImplementedError

            def make_comm_backend(self, rank, world_size):
                raise NotImplementedError


        @sagellm.hookimpl
        def sagellm_register_backends(register):
            register(FakePlatform)
    '''))
    info = root / "fakebackend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakebackend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sagellm.backends]\nfakehw = fakebackend_plugin\n")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(tmp: Path, *extra: str, timeout: float = 240.0) -> Server:
    port = free_port()
    plugin_dir = tmp / "plugins"
    plugin_dir.mkdir()
    write_fake_plugin(plugin_dir)
    env = dict(os.environ)
    # The tests directory too: ``--engine-factory fake_engine:...`` imports the scripted engine.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_dir), str(Path(__file__).parent),
                                                      env.get("PYTHONPATH")]))
    env.pop("SAGELLM_API_KEY", None)
    env.pop("SAGELLM_PLUGINS", None)
    log = tmp / "server.log"
    cmd = [sys.executable, "-m", "sagellm_server.cli", "--port", str(port), "--api-key", API_KEY,
           "--served-model-name", MODEL_NAME, "--log-interval", "1", "--max-request-body-bytes",
           str(256 * 1024), *extra,
           # e.g. "--backend cuda": the same tests against a GPU backend on the device machine.
           *shlex.split(os.environ.get("SAGELLM_TEST_SERVER_ARGS", ""))]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return Server(url, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not become healthy in {timeout} s:\n{log.read_text()}")


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie nobody reaped counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(is_running(p) for p in pids):
        if time.monotonic() > deadline:
            raise AssertionError(f"still running after {timeout} s: {[p for p in pids if is_running(p)]}")
        time.sleep(0.1)


def engine_pid(server: Server) -> int:
    """The current engine process's pid, from the server's latest "ready" log line."""
    pids = re.findall(r"engine process pid (\d+) ready", server.log_text())
    assert pids, server.log_text()
    return int(pids[-1])


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


@contextlib.contextmanager
def serving(server: Server, returncodes: Collection[int] | None = (0,)) -> Iterator[Server]:
    """``server`` for the block; then stopped (SIGTERM) and, unless the block raised, checked: it
    exited with one of ``returncodes`` (None: not checked, for tests that watch it exit) and left
    none of its processes (the engine, multiprocessing's helpers) behind."""
    try:
        yield server
    finally:
        below = descendants(server.proc.pid)
        stop_server(server)
    if returncodes is not None:
        assert server.proc.returncode in returncodes, server.log_text()[-3000:]
    wait_gone(below, 10)
