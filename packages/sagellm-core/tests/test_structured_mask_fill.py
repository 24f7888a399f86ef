"""The step's mask fill begun before the forward (``sagellm.engine.mask_fill``): the reused
host buffers, the checked contract between the runner's ``begin_mask_fill`` and
``sample_tokens``, and whole engines whose constraint allows a different token every step."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.config import EngineConfig
from sagellm.engine.constraint import fill_bitmasks
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.mask_fill import NUM_BUFFERS, BitmaskPool, begin_mask_fill
from sagellm.engine.sequence import SequenceState
from sagellm.engine.step_launch import PENDING_TOKEN, StepLaunch
from sagellm.plugins import Registry
from sagellm.sampling_params import SamplingParams
from sagellm.structured.bitmask import unpack_bitmask
from sagellm.testing.structured import OnlyToken, Scripted
from sagellm.testing.tiny_model import make_tiny_llama


class RecordedEvent:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def synchronize(self) -> None:
        self.log.append("wait")


class EventPlatform(CpuPlatform):
    """The CPU platform, with events as an asynchronous device would have them."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []

    def record_event(self) -> RecordedEvent:
        self.log.append("record")
        return RecordedEvent(self.log)


def _seq(rid: str, constraint: Any) -> SequenceState:
    return SequenceState(rid, [1, 2, 3], SamplingParams(), {0}, constraint=constraint)


# -- the buffers ------------------------------------------------------------------------------


def test_pool_takes_its_buffers_in_turn_and_waits_for_the_copy_that_read_one() -> None:
    platform = EventPlatform()
    pool = BitmaskPool(platform)
    taken = [pool.acquire(2, 100) for _ in range(NUM_BUFFERS)]
    assert [slot for slot, _ in taken] == list(range(NUM_BUFFERS))
    assert len({m.data_ptr() for _, m in taken}) == NUM_BUFFERS
    a_slot, a = taken[0]
    assert a.shape == (2, 4) and a.is_contiguous()
    pool.release(a_slot)
    assert platform.log == ["record"]
    again_slot, again = pool.acquire(1, 100)  # the one free buffer: a's, after its event
    assert again_slot == a_slot and again.data_ptr() == a.data_ptr()
    assert platform.log == ["record", "wait"]
    for slot, _ in taken[1:]:
        pool.release(slot)
    pool.release(again_slot)
    assert pool.acquire(3, 64)[0] == 1  # in turn: the buffer after the last one taken
    grown = pool.num_grown
    pool.acquire(64, 1000)  # larger than any: grown
    assert pool.num_grown == grown + 1


def test_pool_with_every_buffer_held_hands_out_a_new_one_and_refuses_bad_use() -> None:
    pool = BitmaskPool(CpuPlatform())
    held = [pool.acquire(1, 32) for _ in range(NUM_BUFFERS)]
    extra_slot, extra = pool.acquire(1, 32)
    assert extra_slot == -1
    assert len({m.data_ptr() for _, m in held} | {extra.data_ptr()}) == NUM_BUFFERS + 1
    pool.release(extra_slot)  # unpooled: nothing to do
    pool.release(held[0][0])
    with pytest.raises(RuntimeError, match="released twice"):
        pool.release(held[0][0])
    with pytest.raises(ValueError, match="rows > 0 and vocab > 0"):
        pool.acquire(0, 32)
    with pytest.raises(ValueError, match="rows > 0 and vocab > 0"):
        pool.acquire(1, -5)


def test_reused_rows_are_cleared_for_constraints_that_do_not_write_them_all() -> None:
    dirty = torch.full((2, 3), -1, dtype=torch.int32)
    fill_bitmasks([Scripted([40]), OnlyToken(5)], dirty)
    allowed = unpack_bitmask(dirty, 96)
    assert allowed[0].nonzero().flatten().tolist() == [40]
    assert allowed[1].nonzero().flatten().tolist() == [5]
    with pytest.raises(ValueError, match="3 constraints for a bitmask of 2 rows"):
        fill_bitmasks([OnlyToken(1)] * 3, dirty)


# -- the contract -----------------------------------------------------------------------------


def test_take_returns_the_fill_of_exactly_the_rows_it_began_with() -> None:
    pool = BitmaskPool(CpuPlatform())
    a, b, plain = _seq("a", Scripted([3, 4])), _seq("b", OnlyToken(9)), _seq("p", None)
    with begin_mask_fill(pool, [a, plain, b], 64) as fill:  # type: ignore[union-attr]
        mask = fill.take([plain, a, b], 64)  # the same constrained rows, in the same order
        assert unpack_bitmask(mask, 64).nonzero().tolist() == [[0, 3], [1, 9]]
        with pytest.raises(RuntimeError, match="already used"):
            fill.take([a, b], 64)
    assert begin_mask_fill(pool, [plain], 64) is None


@pytest.mark.parametrize("change", ["accepted", "other_rows", "other_constraint", "width"])
def test_take_refuses_a_fill_begun_for_other_rows_or_states(change: str) -> None:
    pool = BitmaskPool(CpuPlatform())
    a, b = _seq("a", Scripted([3, 4])), _seq("b", OnlyToken(9))
    fill = begin_mask_fill(pool, [a, b], 64)
    assert fill is not None
    rows, vocab = [a, b], 64
    if change == "accepted":  # a token committed after the fill began: its mask is stale
        a.append_token(3)
        a.constraint.accept_token(3)  # type: ignore[union-attr]
    elif change == "other_rows":
        rows = [b]
    elif change == "other_constraint":
        b.constraint = OnlyToken(9)
    else:
        vocab = 200
    with fill, pytest.raises(RuntimeError, match="mask fill was begun for"):
        fill.take(rows, vocab)


class Broken(OnlyToken):
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        raise ValueError("broken grammar state")


def test_a_row_that_fails_to_fill_allows_everything_and_fails_alone() -> None:
    """A fill never raises to the step: the failing row allows every token and carries a
    ``constraint_error`` (its request fails when the engine sees its token); the other rows
    get their masks. An unused fill is joined and its buffer handed back."""
    platform = EventPlatform()
    pool = BitmaskPool(platform)
    good, bad = _seq("good", OnlyToken(7)), _seq("bad", Broken(1))
    seqs = [good, bad]
    fill = begin_mask_fill(pool, seqs, 64)
    assert fill is not None
    with fill:
        mask = fill.take(seqs, 64)
    assert unpack_bitmask(mask, 64)[0].nonzero().flatten().tolist() == [7]
    assert bool(unpack_bitmask(mask[1:], 64).all())
    assert good.constraint_error is None
    assert bad.constraint_error is not None and "broken grammar state" in bad.constraint_error
    assert pool.flag.item() == fill.ticket  # the flag is written whatever happened
    unused = begin_mask_fill(pool, [good], 64)
    assert unused is not None
    with unused:  # a step that raised before sampling: joined, the buffer handed back
        pass
    assert platform.log.count("record") == 2
    assert all(pool.acquire(1, 32)[0] >= 0 for _ in range(NUM_BUFFERS))  # all free again


def test_tickets_count_up_modulo_two_to_the_32() -> None:
    pool = BitmaskPool(CpuPlatform())
    assert [pool.ticket(), pool.ticket()] == [1, 2]
    pool._tickets = 0xFFFFFFFF
    assert pool.ticket() == 0
    pool.mark_done(0xFFFFFFFF)
    assert pool.flag.item() == -1  # the same 32 bits, read as int32


def _as_if_pinned(pool: BitmaskPool) -> BitmaskPool:
    """``pool`` with its two buffers made (pageable, this machine has no page-locked memory)
    and then marked page-locked, as on a GPU, so device waits are offered."""
    slots = [pool.acquire(4, 1024)[0] for _ in range(NUM_BUFFERS)]
    for slot in slots:
        pool.release(slot)
    pool.pin = True
    return pool


def test_with_a_device_wait_take_does_not_wait_and_the_flag_follows_the_fill() -> None:
    """``take`` with a device wait returns the buffer while the worker still fills it, after
    queueing a wait for the fill's ticket; the flag reaches that ticket only once the mask is
    written, and ``join`` hands the buffer back without waiting for the worker."""
    release = threading.Event()

    class Slow(OnlyToken):
        def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
            assert release.wait(10)
            super().fill_bitmask(bitmask, row)

    platform = EventPlatform()
    pool = _as_if_pinned(BitmaskPool(platform))
    platform.log.clear()
    waits: list[tuple[int, int]] = []

    def device_wait(flag: torch.Tensor, value: int) -> bool:
        assert flag is pool.flag
        waits.append((int(flag.item()), value))
        return True

    seq = _seq("slow", Slow(11))
    fill = begin_mask_fill(pool, [seq], 64)
    assert fill is not None
    with fill:
        mask = fill.take([seq], 64, device_wait)
        assert fill.device_waits and not fill.future.done()
    assert waits == [(0, fill.ticket)]  # queued while the flag was still behind the ticket
    assert platform.log == ["wait", "record"]  # its buffer's last copy; released at once
    release.set()
    fill.future.result(timeout=10)
    assert pool.flag.item() == fill.ticket
    assert unpack_bitmask(mask, 64)[0].nonzero().flatten().tolist() == [11]


def test_a_device_wait_that_declines_leaves_the_host_waiting() -> None:
    pool = _as_if_pinned(BitmaskPool(CpuPlatform()))
    seq = _seq("a", OnlyToken(3))
    with begin_mask_fill(pool, [seq], 64) as fill:  # type: ignore[union-attr]
        mask = fill.take([seq], 64, lambda flag, value: False)
        assert not fill.device_waits and fill.future.done()
    assert unpack_bitmask(mask, 64)[0].nonzero().flatten().tolist() == [3]


def test_the_worker_accepts_the_pending_token_before_it_fills_and_says_so() -> None:
    """The pending token is accepted (count, completeness) and ``accept_ready`` set before the
    mask is filled, so the engine can go on while the worker fills; a refused token and a step
    that failed each leave a ``constraint_error`` and still set the event."""
    release = threading.Event()
    order: list[str] = []

    class Watched(OnlyToken):
        def accept_token(self, token_id: int) -> bool:
            order.append("accept")
            return super().accept_token(token_id)

        def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
            order.append("fill")
            assert release.wait(10)
            super().fill_bitmask(bitmask, row)

    pool = BitmaskPool(CpuPlatform())
    ok, refused = _seq("ok", Watched(5, length=1)), _seq("refused", OnlyToken(6))
    for s in (ok, refused):
        s.append_token(PENDING_TOKEN)
    prev = StepLaunch.done([ok, refused], [5, 9])
    fill = begin_mask_fill(pool, [ok, refused], 64, prev)
    assert fill is not None and ok.accept_ready is refused.accept_ready is not None
    assert ok.accept_ready.wait(10)
    assert ok.num_accepted_tokens == 1 and ok.constraint_done and ok.constraint_error is None
    assert refused.num_accepted_tokens == 0 and "token 9 is not allowed" in (
        refused.constraint_error or "")
    release.set()
    with fill:
        fill.take([ok, refused], 64)
    assert order == ["accept", "fill"]

    def failed() -> list[int]:
        raise RuntimeError("device lost")

    late = _seq("late", OnlyToken(5))
    late.append_token(PENDING_TOKEN)
    broken = StepLaunch([late], None, failed)
    with begin_mask_fill(pool, [late], 64, broken) as fill2:  # type: ignore[union-attr]
        fill2.take([late], 64)
    assert late.accept_ready is not None and late.accept_ready.is_set()
    assert "the previous step failed: RuntimeError: device lost" in (late.constraint_error or "")


# -- whole engines ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-mask"))


SCRIPTS = [[5, 9, 200, 31, 63, 64], [17, 17, 2, 255, 95], [128, 1, 1, 96]]


def _engine(platform: Any, model: Path) -> LLMEngine:
    config = EngineConfig(model=str(model), dtype="float32", block_size=4, num_kv_blocks=64,
                          max_num_seqs=4, max_model_len=96, max_num_batched_tokens=64,
                          enable_prefix_caching=False)
    return LLMEngine(config, registry=Registry(), platform=platform)


def _run_scripted(engine: LLMEngine, plain: bool = True,
                  make: Any = Scripted) -> dict[str, Any]:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for k, script in enumerate(SCRIPTS):
        engine.add_request([3 + k, 4, 5, 6 + k], greedy, request_id=f"s{k}",
                           constraint=lambda script=script: make(script))
    if plain:
        engine.add_request([7, 8, 9], greedy, request_id="plain")
    done: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _check(done: dict[str, Any]) -> None:
    for k, script in enumerate(SCRIPTS):
        out = done[f"s{k}"]
        assert out.error is None and list(out.token_ids) == script, out


def test_every_step_masks_with_the_state_after_the_previous_token(tiny: Path) -> None:
    """A constraint that allows a different token each step: a mask from the step before (or
    one not applied) gives a refused token. The second and later steps take a begun fill."""
    engine = _engine(CpuPlatform(), tiny)
    runner = engine.runner
    taken: list[bool] = []
    sample_tokens = runner.sample_tokens

    def recording(logits: torch.Tensor, seqs: list[Any], **kw: Any) -> Any:
        if any(s.constraint is not None for s in seqs):
            taken.append(kw.get("mask_fill") is not None)
        else:
            assert kw.get("mask_fill") is None
        return sample_tokens(logits, seqs, **kw)

    runner.sample_tokens = recording  # type: ignore[method-assign]
    _check(_run_scripted(engine))
    assert taken[0] is False and all(taken[1:]) and len(taken) >= 5
    assert runner.bitmasks.num_grown <= NUM_BUFFERS  # reused, not made per step


def test_a_failed_step_rerun_one_at_a_time_uses_fresh_fills(tiny: Path) -> None:
    """The engine reruns a failed step's sequences one by one: each rerun begins its own fill
    (the failed step's was joined, never reused), so the tokens are still the scripts'."""
    engine = _engine(CpuPlatform(), tiny)
    runner = engine.runner
    forward = runner.forward
    calls = {"n": 0}

    def failing_once(inp: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step with every constrained row, after its fill began
            raise RuntimeError("injected step failure")
        return forward(inp)

    runner.forward = failing_once  # type: ignore[method-assign]
    done = _run_scripted(engine, plain=False)
    assert calls["n"] > 3 + len(SCRIPTS)  # the failed step's rows ran again, one at a time
    _check(done)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_device_waits_give_the_scripts_and_the_engine_never_races_the_worker(
        tiny: Path, asynchronous: bool) -> None:
    """The runner's ``queue_mask_wait`` taken up (a stand-in device: it waits on the host for
    the flag to reach the ticket, as a stream would): every step's mask is the one after the
    previous token, pending tokens are accepted once, and no constraint is ever called on two
    threads at once."""
    config = EngineConfig(model=str(tiny), dtype="float32", block_size=4, num_kv_blocks=64,
                          max_num_seqs=4, max_model_len=96, max_num_batched_tokens=64,
                          enable_prefix_caching=False, async_scheduling=asynchronous)
    engine = LLMEngine(config, registry=Registry(), platform=CpuPlatform())
    runner = engine.runner
    runner.bitmasks = _as_if_pinned(BitmaskPool(runner.platform))
    tickets: list[int] = []

    def stand_in(flag: torch.Tensor, value: int) -> bool:
        tickets.append(value)
        deadline = time.monotonic() + 10
        while (int(flag.item()) - value) & 0x80000000:  # cyclic: flag still before value
            assert time.monotonic() < deadline, "the worker never wrote the ticket"
            time.sleep(0.0005)
        return True

    runner.queue_mask_wait = stand_in  # type: ignore[method-assign]
    busy = threading.Lock()
    accepted_on: list[str] = []

    class Exclusive(Scripted):
        def _enter(self) -> None:
            assert busy.acquire(blocking=False), "a constraint called on two threads at once"

        def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
            self._enter()
            try:
                time.sleep(0.002)  # long enough for the engine to come in if it could
                super().fill_bitmask(bitmask, row)
            finally:
                busy.release()

        def accept_token(self, token_id: int) -> bool:
            self._enter()
            accepted_on.append(threading.current_thread().name)
            try:
                return super().accept_token(token_id)
            finally:
                busy.release()

        def is_terminated(self) -> bool:
            self._enter()
            try:
                return super().is_terminated()
            finally:
                busy.release()

    made: list[Exclusive] = []

    def make(script: list[int]) -> Exclusive:
        made.append(Exclusive(script))
        return made[-1]

    _check(_run_scripted(engine, make=make))
    assert len(tickets) >= 4 and tickets == sorted(tickets)
    # Each token was offered to its constraint once: by the worker or by the engine.
    assert [c.accepted for c in made] == [len(s) for s in SCRIPTS]
    on_worker = sum(name.startswith("sagellm-mask-fill") for name in accepted_on)
    assert on_worker > 0 if asynchronous else on_worker == 0
