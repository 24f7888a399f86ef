"""The device's wait for a mask fill's flag word (``sagellm_cuda.host_flag_wait``): the switch,
and on a GPU the wait itself (it holds the stream until the host writes the word, cyclically)
and whole engines whose mask fills outlast the forward, so the device, not the host, waits."""

from __future__ import annotations

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
                                         ("False", False), (" off ", False)])
def test_the_switch(monkeypatch: pytest.MonkeyPatch, raw: str, on: bool) -> None:
    monkeypatch.setenv(hfw.ENV, raw)
    assert hfw.enabled_by_env() is on


def test_a_bad_switch_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hfw.ENV, "sometimes")
    with pytest.raises(ValueError, match="SAGELLM_MASK_DEVICE_WAIT must be 0 or 1"):
        hfw.enabled_by_env()


def test_no_wait_off_the_gpu_or_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hfw.host_flag_wait(torch.device("cpu")) is None
    monkeypatch.setenv(hfw.ENV, "0")
    assert hfw.host_flag_wait(torch.device("cuda", 0)) is None  # decided before any probe


# -- on a GPU ---------------------------------------------------------------------------------


def _settles(event: torch.cuda.Event, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not event.query():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@gpu
@pytest.mark.parametrize(("start", "value"), [(0, 1), (0xFFFFFFFF, 0), (5, 0x80000004)])
def test_the_stream_waits_until_the_host_writes_the_word(start: int, value: int) -> None:
    """Work queued after the wait runs only once the word reaches the value, compared
    cyclically (a counter that wrapped past 2**32 still counts as ahead)."""
    wait = hfw.host_flag_wait(torch.device("cuda", 0))
    assert wait is not None
    flag = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    word = flag.numpy().view("uint32")
    word[0] = start
    out = torch.zeros(1, device="cuda")
    try:
        assert wait(flag, value)
        out += 1
        done = torch.cuda.Event()
        done.record()
        time.sleep(0.05)
        assert not done.query() and not bool(torch.cuda.current_stream().query())
        word[0] = value
        assert _settles(done), "the stream did not go on once the word was written"
        assert out.item() == 1
    finally:
        word[0] = value  # never leave the stream waiting
        torch.cuda.synchronize()


@gpu
def test_a_word_already_there_and_a_flag_that_is_not_page_locked() -> None:
    wait = hfw.host_flag_wait(torch.device("cuda", 0))
    assert wait is not None
    flag = torch.full((1,), 7, dtype=torch.int32, pin_memory=True)
    assert wait(flag, 7) and wait(flag, 3)
    torch.cuda.synchronize()
    assert not wait(torch.zeros(1, dtype=torch.int32), 1)  # pageable: nothing queued
    assert not wait(torch.zeros(1, dtype=torch.int64, pin_memory=True), 1)


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
        tmp_path: Path, enforce_eager: bool) -> None:
    """Each fill sleeps longer than the tiny model's step, so the host runs ahead of the worker
    and the device waits on the flag: every token is still the script's (a mask read before it
    was written, or a pending token accepted twice, gives a refusal), no constraint is ever
    called on two threads at once, and the device waits were the path taken."""
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
