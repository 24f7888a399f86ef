"""The step's mask fill begun before the forward (``sagellm.engine.mask_fill``): the reused
host buffers, the checked contract between the runner's ``begin_mask_fill`` and
``sample_tokens``, and whole engines whose constraint allows a different token every step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.config import EngineConfig
from sagellm.engine.constraint import fill_bitmasks
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.mask_fill import BitmaskPool, begin_mask_fill
from sagellm.engine.sequence import SequenceState
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


def test_pool_alternates_two_buffers_and_waits_for_the_copy_that_read_one() -> None:
    platform = EventPlatform()
    pool = BitmaskPool(platform)
    a_slot, a = pool.acquire(2, 100)
    b_slot, b = pool.acquire(3, 64)
    assert a_slot != b_slot and a.data_ptr() != b.data_ptr()
    assert a.shape == (2, 4) and b.shape == (3, 2) and a.is_contiguous()
    pool.release(a_slot)
    assert platform.log == ["record"]
    again_slot, again = pool.acquire(1, 100)  # the free buffer: a's, after its event
    assert again_slot == a_slot and again.data_ptr() == a.data_ptr()
    assert platform.log == ["record", "wait"]
    pool.release(b_slot)
    pool.release(again_slot)
    grown = pool.num_grown
    pool.acquire(64, 1000)  # larger than either: grown
    assert pool.num_grown == grown + 1


def test_pool_with_both_buffers_held_hands_out_a_new_one_and_refuses_bad_use() -> None:
    pool = BitmaskPool(CpuPlatform())
    s0, m0 = pool.acquire(1, 32)
    s1, m1 = pool.acquire(1, 32)
    s2, m2 = pool.acquire(1, 32)
    assert s2 == -1 and len({m0.data_ptr(), m1.data_ptr(), m2.data_ptr()}) == 3
    pool.release(s2)  # unpooled: nothing to do
    pool.release(s0)
    with pytest.raises(RuntimeError, match="released twice"):
        pool.release(s0)
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


def test_a_fill_error_reaches_the_step_and_an_unused_fill_is_joined() -> None:
    class Broken(OnlyToken):
        def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
            raise ValueError("broken grammar state")

    platform = EventPlatform()
    pool = BitmaskPool(platform)
    seqs = [_seq("x", Broken(1))]
    fill = begin_mask_fill(pool, seqs, 32)
    assert fill is not None
    with pytest.raises(ValueError, match="broken grammar state"):
        fill.take(seqs, 32)
    fill.join()
    unused = begin_mask_fill(pool, seqs, 32)
    assert unused is not None
    with unused:  # a step that raised before sampling: joined, the buffer handed back
        pass
    assert platform.log.count("record") == 2
    assert pool.acquire(1, 32)[0] >= 0 and pool.acquire(1, 32)[0] >= 0  # both free again


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


def _run_scripted(engine: LLMEngine, plain: bool = True) -> dict[str, Any]:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for k, script in enumerate(SCRIPTS):
        engine.add_request([3 + k, 4, 5, 6 + k], greedy, request_id=f"s{k}",
                           constraint=lambda script=script: Scripted(script))
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
    assert runner.bitmasks.num_grown <= 2  # reused, not made per step


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
