"""Starting, watching and stopping the other ranks of a multi-process engine.

The engine's builder calls :func:`launch` (through :func:`sagellm.distributed.launch_layout`) when ``tensor_parallel_size > 1`` or ``disaggregate_prefill``
is set. Rank 0 is the process the user created the engine in; it schedules and samples. The
other ranks are started here with ``torch.multiprocessing`` (spawn) - one per device, device
index ``config.device_index + rank`` - or, when the process was itself started by ``torchrun``
(several nodes), they already exist: every rank runs the same script, and on ranks other than 0
the ``LLM(...)``/``LLMEngine(...)`` call serves as a worker and ends the process (``SystemExit(0)``)
when rank 0 shuts down::

    torchrun --nnodes 2 --nproc-per-node 4 --node-rank $NODE --master-addr $HEAD \\
        --master-port 29500 my_script.py          # my_script: LLM(model, tensor_parallel_size=8)
    torchrun ... -m sagellm.cli generate --tensor-parallel-size 8 --model /m --prompt hi

Crashes: a thread on rank 0 waits on every spawned process; if one dies, the engine records why,
aborts the process group where the backend needs it (NCCL would otherwise wait forever; gloo
fails on the closed socket by itself), and the step in flight raises :class:`WorkerFailure`.
Every later call raises the same error. Under ``torchrun`` there are no local processes to watch:
a lost rank surfaces as a collective error (gloo) or the process group's timeout.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait as wait_any
from typing import Any

import torch
import torch.distributed as dist

from sagellm.config import EngineConfig
from sagellm.distributed.topology import Topology, exchange
from sagellm.distributed.wire import Channel
from sagellm.layers.parallel import TPGroup
from sagellm.protocols import CommBackend, Platform

logger = logging.getLogger("sagellm.distributed")

#: Commands rank 0 sends on the step channel.
CMD_STEP, CMD_SHUTDOWN, CMD_PREFILL, CMD_STATS = 1, 2, 3, 4

#: How long rank 0 waits for spawned ranks to reach the rendezvous.
STARTUP_TIMEOUT_S = float(os.environ.get("SAGELLM_DIST_STARTUP_TIMEOUT_S", "600"))
# Collectives may wait as long as the engine idles (a worker waits for the next step inside a
# broadcast), so the process group's own timeout is effectively off; crashes are found by
# watching the processes instead.
OP_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("SAGELLM_DIST_TIMEOUT_S", str(365 * 86400))))

_ALIVE_KEY = "sagellm/alive/{}"


class WorkerFailure(RuntimeError):
    """Another rank of the engine died or a collective failed; the engine has stopped."""


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by ``torchrun``.

    Also for any launcher that sets the same variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``, ``LOCAL_RANK``). ``LOCAL_RANK`` (the process's index on its host, which picks
    its device) is required: ``RANK`` in its place would be right on one host only.
    """
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env and not ("RANK" in env and "MASTER_ADDR" in env):
        return None
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in env]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: a rank started by a launcher needs RANK, "
                         "WORLD_SIZE and LOCAL_RANK (its index among the ranks on its host), as "
                         "torchrun sets them")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError as exc:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {exc}") from None
    if not (0 <= rank < world and 0 <= local <= rank):
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: need "
                         "0 <= LOCAL_RANK <= RANK < WORLD_SIZE")
    return rank, world, local


def _describe_exit(rank: int, pid: int | None, exitcode: int | None, role: str) -> str:
    who = f"{role} worker rank {rank} (pid {pid})"
    if exitcode is None:
        return f"{who} stopped responding"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        return f"{who} was killed by signal {name}"
    return f"{who} exited with code {exitcode} (see its traceback above)"


class WorkerGroup:
    """Rank 0's view of the other ranks: the communicator, the step channel, the processes."""

    def __init__(self, role: str, config: EngineConfig, platform: Platform, comm: CommBackend,
                 processes: dict[int, Any], topology: Topology) -> None:
        self.role = role
        #: Which ranks share a host (see :mod:`sagellm.distributed.topology`).
        self.topology = topology
        self.config = config
        self.platform = platform
        self.comm = comm
        self.world_size = comm.world_size
        self.channel = Channel(comm, src=0)
        self.processes = processes
        self.tp = TPGroup(0, self.world_size, comm) if role == "tensor-parallel" else TPGroup()
        self.failure: str | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._in_step = False
        #: Set once rank 0's engine has its runner; a group left unattached is from an engine
        #: that failed to start, and the next :func:`launch` stops it.
        self.attached = False
        self._abort_pg = dist.get_backend() != "gloo"
        self._watcher = threading.Thread(target=self._watch, name="sagellm-worker-watch", daemon=True)
        if processes:
            self._watcher.start()
        atexit.register(self.shutdown)

    # -- failure detection -----------------------------------------------------------------

    def _watch(self) -> None:
        while not self._closing.is_set():
            alive = {p.sentinel: r for r, p in self.processes.items() if p.exitcode is None}
            if not alive:
                return
            for sentinel in wait_any(list(alive), timeout=0.5):
                rank = alive[sentinel]  # type: ignore[index]
                proc = self.processes[rank]
                proc.join(timeout=1.0)
                if self._closing.is_set():
                    return
                self._record_failure(_describe_exit(rank, proc.pid, proc.exitcode, self.role))

    def _record_failure(self, message: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = message
        logger.error("%s; stopping the engine", message)
        if self._abort_pg:
            # NCCL-like backends wait forever on a dead peer: abort so the step in flight errors.
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            try:
                if abort is not None:
                    abort()
            except Exception:  # pragma: no cover - best effort on accelerators
                logger.exception("aborting the process group failed")

    def check(self) -> None:
        """Raise :class:`WorkerFailure` if the engine has stopped."""
        if self.failure is not None:
            raise WorkerFailure(f"{self.failure}; the engine has stopped")
        if self._closed:
            raise WorkerFailure("the engine was shut down")

    def run_step(self, fn: Callable[[], Any]) -> Any:
        """Run one collective step; any error stops the engine and raises :class:`WorkerFailure`."""
        self.check()
        self._in_step = True
        try:
            out = fn()
        except Exception as exc:
            self.fail(exc)
        self._in_step = False
        return out

    def fail(self, exc: BaseException) -> None:
        # A collective usually errors a moment before the watcher sees the process exit.
        deadline = time.monotonic() + 2.0
        while self.failure is None and self.processes and time.monotonic() < deadline:
            dead = [(r, p) for r, p in self.processes.items() if p.exitcode is not None]
            if dead:
                rank, proc = dead[0]
                self._record_failure(_describe_exit(rank, proc.pid, proc.exitcode, self.role))
            else:
                time.sleep(0.05)
        if self.failure is None:
            self._record_failure(f"a {self.role} step failed on rank 0: {type(exc).__name__}: {exc}")
        message = self.failure
        self.shutdown()
        raise WorkerFailure(f"{message}; the engine has stopped") from exc

    # -- shutdown --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the other ranks and leave the process group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self.failure is None and not self._in_step:
            try:
                self.channel.send(CMD_SHUTDOWN)
            except Exception:
                logger.warning("could not tell the workers to stop; terminating them")
        for proc in self.processes.values():
            proc.join(timeout=10.0 if self.failure is None else 0.5)
            if proc.exitcode is None:
                proc.terminate()
                proc.join(timeout=3.0)
            if proc.exitcode is None:
                proc.kill()
                proc.join(timeout=3.0)
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # pragma: no cover
            logger.exception("destroying the process group failed")
        atexit.unregister(self.shutdown)
        logger.info("%s workers stopped", self.role)


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------


def _role_and_world(config: EngineConfig) -> tuple[str, int]:
    if config.tensor_parallel_size > 1 and config.disaggregate_prefill:
        raise ValueError("tensor parallelism and prefill/decode disaggregation cannot be combined yet")
    if config.tensor_parallel_size > 1:
        return "tensor-parallel", config.tensor_parallel_size
    return "prefill", 2


def worker_config(config: EngineConfig, role: str, platform: Platform, device_index: int
                  ) -> EngineConfig:
    """The configuration a worker rank builds its engine from."""
    update: dict[str, object] = {"backend": platform.name, "device_index": device_index}
    if role == "prefill":
        update.update(disaggregate_prefill=False, tensor_parallel_size=1)
    else:
        # Every rank runs core's eager runner: a platform runner that replays captured graphs
        # would skip the step broadcast and leave the other ranks waiting.
        update["enforce_eager"] = True
    return config.model_copy(update=update)


def _init_group(backend: str, rank: int, world_size: int, store: dist.Store | None,
                device: torch.device) -> None:
    kwargs: dict[str, object] = {"timeout": OP_TIMEOUT, "rank": rank, "world_size": world_size}
    if store is None:
        kwargs["init_method"] = "env://"
    else:
        kwargs["store"] = store
    dist.init_process_group(backend, **kwargs)  # type: ignore[arg-type]


_active: WorkerGroup | None = None


def launch(config: EngineConfig, platform: Platform) -> WorkerGroup:
    """Start (or, under ``torchrun``, join) the other ranks; returns rank 0's :class:`WorkerGroup`.

    On a ``torchrun`` rank other than 0 this serves as that rank's worker and never returns.
    """
    global _active
    role, world = _role_and_world(config)
    if _active is not None and not _active.attached:
        logger.warning("stopping the workers of an engine that failed to start")
        _active.shutdown()
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process: one "
                           "multi-rank engine per process (shut the previous one down first)")
    if role == "tensor-parallel":
        _check_divisible(config)
    backend = platform.capabilities().dist_backend
    trun = torchrun_env()
    processes: dict[int, Any] = {}
    if trun is not None:
        rank, trun_world, local_rank = trun
        if trun_world != world:
            raise ValueError(f"torchrun started {trun_world} processes; this engine needs {world}")
        if rank != 0:
            cfg = worker_config(config, role, platform, config.device_index + local_rank)
            code = run_worker(role, cfg.model_dump_json(), type(platform), rank, world, None, 0,
                              cfg.device_index, logging.getLogger().level)
            raise SystemExit(code)
        _init_group(backend, 0, world, None, platform.device)
    else:
        store = dist.TCPStore("127.0.0.1", 0, world, True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
        ctx = _mp_context()
        for rank in range(1, world):
            cfg = worker_config(config, role, platform, config.device_index + rank)
            proc = ctx.Process(
                target=_spawned_worker, name=f"sagellm-{role}-{rank}", daemon=True,
                args=(role, cfg.model_dump_json(), type(platform), rank, world, "127.0.0.1",
                      store.port, cfg.device_index, logging.getLogger().level))
            proc.start()
            processes[rank] = proc
        _wait_for_ranks(store, processes, role)
        _init_group(backend, 0, world, store, platform.device)
    comm = platform.make_comm_backend(0, world)
    topo = join_topology(comm, platform, config.device_index)
    if role == "tensor-parallel":
        config = worker_config(config, role, platform, config.device_index)
    # (With disaggregation rank 0 is the decode worker and keeps the user's settings.)
    logger.info("%s engine: %s over %s (%s)", role, topo.describe(), backend,
                "torchrun" if trun else "spawned")
    _active = WorkerGroup(role, config, platform, comm, processes, topo)
    return _active


def join_topology(comm: CommBackend, platform: Platform, device_index: int) -> Topology:
    """Collective, on every rank right after its communicator exists: who shares a host."""
    topo = exchange(comm, device_index)
    topo.check_devices(platform.device.type)
    return topo


def _check_divisible(config: EngineConfig) -> None:
    """Fail before starting any process when the heads cannot be split (HF directories only)."""
    from pathlib import Path

    path = Path(config.model).expanduser() if config.model else None
    if path is None or not (path / "config.json").is_file():
        return  # GGUF or the embedded default: the model constructor checks on every rank
    import json

    hf = json.loads((path / "config.json").read_text())
    n, heads = config.tensor_parallel_size, hf.get("num_attention_heads")
    kv = hf.get("num_key_value_heads") or heads
    if heads and heads % n:
        raise ValueError(f"attention heads ({heads}) is not divisible by tensor_parallel_size ({n})")
    if kv and kv % n and n % kv:
        raise ValueError(f"tensor_parallel_size ({n}) must divide the key/value heads ({kv}) "
                         f"or be a multiple of them")


def _mp_context() -> Any:
    """``forkserver`` where it exists: workers fork from a server that imported torch and sageLLM
    once, so starting an engine does not pay those imports again; ``spawn`` elsewhere. Both
    start a clean interpreter state (no inherited CUDA context or threads)."""
    import multiprocessing

    method = os.environ.get("SAGELLM_WORKER_START_METHOD")
    if method is None:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = torch.multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["sagellm.distributed._preload"])
    return ctx


def _wait_for_ranks(store: dist.Store, processes: dict[int, Any], role: str) -> None:
    """Block until every spawned rank reached the rendezvous; fail fast if one dies first."""
    keys = [_ALIVE_KEY.format(r) for r in processes]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not store.check(keys):
        for rank, proc in processes.items():
            if proc.exitcode is not None:
                for p in processes.values():
                    p.kill()
                raise WorkerFailure(_describe_exit(rank, proc.pid, proc.exitcode, role)
                                    + " while starting")
        if time.monotonic() > deadline:
            for p in processes.values():
                p.kill()
            raise WorkerFailure(f"{role} workers did not start within {STARTUP_TIMEOUT_S:.0f} s")
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------


def _watch_parent() -> None:
    """Exit if rank 0 disappears (killed without running its shutdown)."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=loop, name="sagellm-parent-watch", daemon=True).start()


def _spawned_worker(role: str, config_json: str, platform_cls: type[Platform], rank: int,
                    world_size: int, host: str, port: int, device_index: int, log_level: int
                    ) -> None:
    _watch_parent()
    code = run_worker(role, config_json, platform_cls, rank, world_size, host, port,
                      device_index, log_level)
    # Skip interpreter teardown: torch and tokenizers threads can hang a clean exit.
    logging.shutdown()
    os._exit(code)


def run_worker(role: str, config_json: str, platform_cls: type[Platform], rank: int,
               world_size: int, host: str | None, port: int, device_index: int, log_level: int
               ) -> int:
    """Body of a worker rank: join the group, build the engine, serve steps until told to stop."""
    logging.basicConfig(level=log_level or logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        config = EngineConfig.model_validate_json(config_json)
        platform = platform_cls(device_index)
        platform.set_device()
        store = None
        if host is not None:
            store = dist.TCPStore(host, port, world_size, False,
                                  timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
            store.set(_ALIVE_KEY.format(rank), str(os.getpid()))
        _init_group(platform.capabilities().dist_backend, rank, world_size, store, platform.device)
        comm = platform.make_comm_backend(rank, world_size)
        topo = join_topology(comm, platform, device_index)
        if platform.device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            # The ranks on this host share its cores; oversubscribed threads slow everyone down.
            # An explicit OMP_NUM_THREADS wins (e.g. several "hosts" sharing one machine).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // topo.local_world_size))
        from sagellm.engine.builder import build_parts

        if role == "tensor-parallel":
            from sagellm.distributed.tp_worker import serve_tensor_parallel

            serve_tensor_parallel(build_parts(config, platform, TPGroup(rank, world_size, comm)),
                                  comm)
        else:
            from sagellm.distributed.disagg import serve_prefill

            serve_prefill(build_parts(config, platform), comm)
        dist.destroy_process_group()
        return 0
    except Exception:
        logging.getLogger("sagellm.distributed").error("%s worker rank %d failed:\n%s", role, rank,
                                                       traceback.format_exc())
        return 1
