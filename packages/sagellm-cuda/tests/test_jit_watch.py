"""``sagellm_cuda.jit_watch``: Triton compiles are counted through ``jit_post_compile_hook``
(an earlier hook still runs), and once an engine has started each one is logged as a compile
that requests waited for."""

from __future__ import annotations

import logging
from collections import Counter, deque
from types import SimpleNamespace
from typing import Any

import pytest

from sagellm_cuda import jit_watch


@pytest.fixture
def watch(monkeypatch: pytest.MonkeyPatch) -> Any:
    from triton import knobs

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook",
                        lambda *a, **kw: calls.append(kw))
    monkeypatch.setattr(jit_watch, "_installed", False)
    monkeypatch.setattr(jit_watch, "_started", False)
    monkeypatch.setattr(jit_watch, "counts", Counter())
    monkeypatch.setattr(jit_watch, "while_serving", Counter())
    monkeypatch.setattr(jit_watch, "recent", deque(maxlen=4))
    assert jit_watch.install() and jit_watch.install()  # the second call changes nothing
    return knobs.runtime.jit_post_compile_hook, calls


def test_compiles_are_counted_and_the_earlier_hook_still_runs(watch: Any) -> None:
    hook, earlier = watch
    hook(key=1, repr="_prefill_kernel[...]", fn=SimpleNamespace(name="_prefill_kernel"),
         compile={}, is_manual_warmup=False, already_compiled=False)
    hook(key=2, repr="r", fn=SimpleNamespace(name="_prefill_kernel"))
    hook(key=3, repr="r", fn=SimpleNamespace(name="_write_kv_kernel"))
    assert jit_watch.counts == Counter({"_prefill_kernel": 2, "_write_kv_kernel": 1})
    assert jit_watch.total() == 3 and not jit_watch.while_serving
    assert [c["key"] for c in earlier] == [1, 2, 3]
    assert list(jit_watch.recent)[0] == ("_prefill_kernel", "_prefill_kernel[...]")


def test_after_an_engine_started_each_compile_is_logged(watch: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from sagellm_cuda.plugin import sagellm_engine_started

    hook, _ = watch
    hook(key=1, repr="before", fn=SimpleNamespace(name="warm_kernel"))
    with caplog.at_level(logging.INFO, logger="sagellm.cuda.jit"):
        sagellm_engine_started(engine_info={"backend": "cuda"})
        hook(key=2, repr="_decode_merge_kernel[SPLITS_PAD=16]",
             fn=SimpleNamespace(name="_decode_merge_kernel"))
    assert jit_watch.while_serving == Counter({"_decode_merge_kernel": 1})
    assert jit_watch.counts["warm_kernel"] == 1
    [rec] = [r for r in caplog.records if r.name == "sagellm.cuda.jit"]
    assert "_decode_merge_kernel" in rec.getMessage() and "SPLITS_PAD=16" in rec.getMessage()


def test_a_hook_without_fn_counts_as_unknown(watch: Any) -> None:
    hook, _ = watch
    hook()
    assert jit_watch.counts == Counter({"?": 1})
