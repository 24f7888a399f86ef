"""The device's wait for a mask fill's flag word (``sagellm_cuda.host_flag_wait``): the switch
(on unless turned off), the check in a child process that guards it, and on a GPU the wait
itself and whole engines whose mask fills outlast the forward, so the device, not the host,
waits."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm.testing.structured import Scripted, run_scripted_beside_greedy
from sagellm.testing.tiny_model import make_tiny_llama
from sagellm_cuda import host_flag_wait as hfw

gpu = pytest.mark.gpu


@pytest.mark.parametrize(("raw", "on"), [("", True), ("1", True), ("on", True), ("0", False),
                                         ("False", False), (" off ", False), ("YES", True)])
def test_the_switch_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch, raw: str,
                                        on: bool) -> None:
    monkeypatch.setenv(hfw.ENV, raw)
    assert hfw.enabled_by_env() is on


def test_a_bad_switch_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hfw.ENV, "sometimes")
    with pytest.raises(ValueError, match="SAGELLM_MASK_DEVICE_WAIT must be 0 or 1"):
        hfw.enabled_by_env()


def test_no_wait_off_the_gpu_or_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    monkeypatch.setattr(hfw, "_PROBES", {})
    monkeypatch.setattr(hfw, "_start_check", lambda index: started.append(index))
    monkeypatch.delenv(hfw.ENV, raising=False)
    assert hfw.host_flag_wait(torch.device("cpu")) is None
    monkeypatch.setenv(hfw.ENV, "0")
    assert hfw.host_flag_wait(torch.device("cuda", 0)) is None
    assert started == []  # decided before any probe


def test_the_check_runs_in_a_child_and_reports_what_went_wrong() -> None:
    """The child process answers (here, without a GPU driver, that there is no entry point),
    and a child that does not finish in time is reported, not waited for."""
    if not torch.cuda.is_available():
        verdict = hfw.check(0, timeout_s=120)
        assert verdict == "no cuStreamWaitValue32_v2" or "exited with" in verdict, verdict
    assert hfw.check(0, timeout_s=0.01) == "the check did not finish in 0.01 s"


class _Answer:
    def __init__(self, verdict: str, asked: list[str]) -> None:
        self.verdict, self.asked = verdict, asked

    def result(self) -> str:
        self.asked.append(self.verdict)
        return self.verdict


def test_the_check_starts_with_the_wait_and_is_answered_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Making the wait starts the check's child (once per device); the first use takes its
    answer, and a failed check logs why and keeps the host wait from then on."""
    started: list[int] = []
    asked: list[str] = []
    verdicts = {0: "the stream did not see the host's write", 1: "ok"}
    monkeypatch.setattr(hfw, "_PROBES", {})
    monkeypatch.setattr(hfw, "_load", lambda: (lambda *a: 0))

    def start(index: int) -> _Answer:
        started.append(index)
        return _Answer(verdicts[index], asked)

    monkeypatch.setattr(hfw, "_start_check", start)
    monkeypatch.delenv(hfw.ENV, raising=False)
    assert hfw.host_flag_wait(torch.device("cuda", 0)) is not None
    assert hfw.host_flag_wait(torch.device("cuda", 0)) is not None
    assert hfw.host_flag_wait(torch.device("cuda", 1)) is not None
    assert started == [0, 1] and asked == []  # started, not yet waited for
    bad, good = hfw._PROBES[0], hfw._PROBES[1]
    with caplog.at_level(logging.WARNING, logger="sagellm.cuda"):
        assert not bad.usable() and not bad.usable()
        assert good.usable()
    assert asked == [verdicts[0], "ok"]  # each answer taken once
    assert caplog.text.count("did not see the host's write") == 1


def test_no_driver_entry_point_means_no_wait_and_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    monkeypatch.setattr(hfw, "_PROBES", {})
    monkeypatch.setattr(hfw, "_load", lambda: None)
    monkeypatch.setattr(hfw, "_start_check", lambda index: started.append(index))
    monkeypatch.delenv(hfw.ENV, raising=False)
    assert hfw.host_flag_wait(torch.device("cuda", 0)) is None and started == []
    assert not hfw._PROBES[0].usable()


def test_a_child_that_overruns_is_killed_and_reported(tmp_path: Path) -> None:
    """The pending check's deadline runs from its start: a child still running at ``result``
    past it is killed, and a child that fails says how."""
    import subprocess
    import sys

    pending = hfw._PendingCheck.__new__(hfw._PendingCheck)
    pending.timeout_s, pending.deadline = 0.2, time.monotonic() + 0.2
    pending.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert pending.result() == "the check did not finish in 0.2 s"
    assert pending.proc.returncode is not None  # killed, not left running
    pending.deadline = time.monotonic() + 30
    pending.proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('no GPU here')"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert pending.result() == "the check exited with 1: no GPU here"


# -- on a GPU ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device_waits() -> None:
    """Skips (with the check's own words) where the GPU cannot wait on a host word: the
    engine then keeps the host wait, which the other GPU tests cover."""
    verdict = hfw.check(0)
    if verdict != "ok":
        pytest.skip(f"the GPU's wait on a host word failed its check: {verdict}")


@gpu
@pytest.mark.parametrize(("start", "value"), [(0xFFFFFFFF, 0), (5, 0x80000004)])
def test_the_wait_compares_cyclically(device_waits: None, start: int, value: int) -> None:
    """A counter that wrapped past 2**32 still counts as ahead (in the child, so a wait that
    never ends cannot hang the suite)."""
    assert hfw.check(0, start=start, value=value) == "ok"


def _engine(model: Path, **kw: Any):  # type: ignore[no-untyped-def]
    from sagellm.config import EngineConfig
    from sagellm.engine.llm_engine import LLMEngine
    from sagellm_cuda.plugin import CudaPlatform

    config = EngineConfig(model=str(model), dtype="float32", num_kv_blocks=128, max_num_seqs=8,
                          max_model_len=256, enable_prefix_caching=False, **kw)
    return LLMEngine(config, platform=CudaPlatform(0))


SCRIPTS = [[5, 9, 200, 31, 63, 64, 7, 7], [17, 17, 2, 255, 95], [128, 1, 1, 96, 3, 4]]


@gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_slow_fills_are_waited_for_by_the_device_and_never_raced(
        device_waits: None, tmp_path: Path, enforce_eager: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fill sleeps longer than the tiny model's step, so the host runs ahead of the worker
    and the device waits on the flag: every token is still the script's (a mask read before it
    was written, or a pending token accepted twice, gives a refusal), no constraint is ever
    called on two threads at once, and the device waits were the path taken."""
    monkeypatch.setenv(hfw.ENV, "1")
    engine = _engine(make_tiny_llama(tmp_path), enforce_eager=enforce_eager)
    assert engine.async_scheduling
    runner = engine.runner
    queued = {"n": 0}
    wait = runner._mask_wait
    assert wait is not None

    def counting(flag: torch.Tensor, value: int) -> bool:
        queued["n"] += 1
        return wait(flag, value)

    runner._mask_wait = counting
    busy = threading.Lock()

    class SlowExclusive(Scripted):
        def _call(self, fn: Any, *a: Any) -> Any:
            assert busy.acquire(blocking=False), "a constraint called on two threads at once"
            try:
                return fn(*a)
            finally:
                busy.release()

        def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
            def slow() -> None:
                time.sleep(0.004)
                Scripted.fill_bitmask(self, bitmask, row)
            self._call(slow)

        def accept_token(self, token_id: int) -> bool:
            return self._call(Scripted.accept_token, self, token_id)  # type: ignore[no-any-return]

        def is_terminated(self) -> bool:
            return self._call(Scripted.is_terminated, self)  # type: ignore[no-any-return]

    outs = run_scripted_beside_greedy(engine, SCRIPTS, constraint_class=SlowExclusive)
    for out, script in zip(outs, SCRIPTS, strict=True):
        assert out.error is None and list(out.token_ids) == script, out
    assert queued["n"] > 0
