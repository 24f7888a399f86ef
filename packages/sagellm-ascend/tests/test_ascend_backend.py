"""Ascend-specific behaviour: which path attention takes, availability reasons, CLI messages."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm import plugins
from sagellm.cli import main
from sagellm.testing import make_paged_case
from sagellm_ascend import _emulated_ops
from sagellm_ascend.attention import AscendAttentionBackend
from sagellm_ascend.platform import AscendPlatform

SCALE = 0.25


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SAGELLM_ASCEND_EMULATE", raising=False)
    monkeypatch.setattr(plugins, "_cached", None)
    yield
    sys.modules.pop("torch_npu", None)  # a fake imported by a test must not outlive it
    importlib.invalidate_caches()


def _run_all(attn: AscendAttentionBackend) -> list[torch.Tensor]:
    """Prefill without prefix, prefill over a prefix, decode; returns (got - want) per call."""
    errors = []
    for seq_lens, ctx in (([6, 3], [0, 0]), ([9, 5], [4, 2]), ([7, 2], [6, 1])):
        case = make_paged_case(seq_lens, ctx, 4, 2, 16, 4, seed=len(errors))
        shape = (case.num_blocks, 4, 2, 16)
        kc, vc = torch.zeros(shape), torch.zeros(shape)
        for i, c in enumerate(ctx):
            attn.write_kv(case.keys[i][:c], case.values[i][:c], kc, vc,
                          torch.tensor(case.slots(i, 0, c)))
        key = torch.cat([case.keys[i][c:] for i, c in enumerate(ctx)])
        value = torch.cat([case.values[i][c:] for i, c in enumerate(ctx)])
        slots = torch.tensor([s for i, c in enumerate(ctx) for s in case.slots(i, c, seq_lens[i])])
        attn.write_kv(key, value, kc, vc, slots)
        query = torch.cat(case.queries)
        if all(s - c == 1 for s, c in zip(seq_lens, ctx, strict=True)):
            out = attn.decode(query, kc, vc, case.decode_metadata(torch.device("cpu")), SCALE)
        else:
            out = attn.prefill(query, key, value, kc, vc, case.prefill_metadata(torch.device("cpu")), SCALE)
        errors.append((out.double() - case.expected(SCALE)).abs().max())
    return errors


def _counting(module: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    calls: dict[str, list[dict[str, Any]]] = {}
    for name in ("_npu_reshape_and_cache", "npu_fused_infer_attention_score"):
        real = getattr(module, name)

        def wrapper(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.setdefault(_name, []).append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls


def test_emulation_goes_through_the_fused_op_call_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_ASCEND_EMULATE", "cpu")
    calls = _counting(_emulated_ops, monkeypatch)
    attn = AscendPlatform().make_attention_backend()
    assert all(e < 1e-4 for e in _run_all(attn))
    assert attn.fallback_reasons == {}
    fia = calls["npu_fused_infer_attention_score"]
    assert [c["input_layout"] for c in fia] == ["TND", "TND", "BSH"]
    assert "block_table" not in fia[0] and fia[1]["block_table"].dtype == torch.int32
    assert fia[0]["actual_seq_lengths"] == [6, 9] and fia[1]["actual_seq_lengths_kv"] == [9, 5]
    assert len(calls["_npu_reshape_and_cache"]) == 9  # two prefixes + the new tokens, per case


def test_a_failing_fused_op_falls_back_once_and_stays_off() -> None:
    def broken(**kwargs: Any) -> Any:
        broken.calls += 1  # type: ignore[attr-defined]
        raise RuntimeError("EZ9999: kernel does not support this shape")

    broken.calls = 0  # type: ignore[attr-defined]
    ops = types.SimpleNamespace(SAGELLM_FUSED_DTYPES=(torch.float32,), _npu_reshape_and_cache=broken,
                                npu_fused_infer_attention_score=broken)
    attn = AscendAttentionBackend(ops)  # type: ignore[arg-type]
    assert all(e < 1e-4 for e in _run_all(attn))
    assert set(attn.fallback_reasons) == {"write_kv", "prefill", "decode"}
    assert "EZ9999" in attn.fallback_reasons["prefill"]
    assert broken.calls == 3  # type: ignore[attr-defined]


def test_older_torch_npu_scale_value_spelling_is_used() -> None:
    def old_fia(*args: Any, scale_value: float = 1.0, **kwargs: Any) -> Any:
        if "scale" in kwargs:
            raise TypeError("npu_fused_infer_attention_score() got an unexpected keyword 'scale'")
        return _emulated_ops.npu_fused_infer_attention_score(*args, scale=scale_value, **kwargs)

    ops = types.SimpleNamespace(SAGELLM_FUSED_DTYPES=(torch.float32,),
                                _npu_reshape_and_cache=_emulated_ops._npu_reshape_and_cache,
                                npu_fused_infer_attention_score=old_fia)
    attn = AscendAttentionBackend(ops)  # type: ignore[arg-type]
    assert all(e < 1e-4 for e in _run_all(attn))
    assert attn.fallback_reasons == {} and attn._scale_kw == "scale_value"


def test_float32_on_real_ops_uses_the_reference() -> None:
    def never(**kwargs: Any) -> Any:
        raise AssertionError("the fused op takes only float16/bfloat16")

    ops = types.SimpleNamespace(_npu_reshape_and_cache=never, npu_fused_infer_attention_score=never)
    assert all(e < 1e-4 for e in _run_all(AscendAttentionBackend(ops)))  # type: ignore[arg-type]


# -- availability --------------------------------------------------------------------------


def _fake_torch_npu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                    npu: object | None = None) -> None:
    (tmp_path / "torch_npu.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("torch_npu", None)
    if npu is not None:
        monkeypatch.setattr(torch, "npu", npu, raising=False)


def test_without_torch_npu_the_reason_says_what_to_install() -> None:
    avail = AscendPlatform.is_available()
    assert not avail.available
    assert "torch_npu is not installed" in avail.reason and "pip install torch-npu" in avail.reason


def test_torch_npu_that_fails_to_import_is_a_driver_problem(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torch_npu(tmp_path, monkeypatch,
                    "raise ImportError('libascendcl.so: cannot open shared object file')\n")
    avail = AscendPlatform.is_available()
    assert not avail.available
    assert "failed to import" in avail.reason and "libascendcl.so" in avail.reason
    assert "CANN" in avail.reason


def test_no_visible_npu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npu = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)
    _fake_torch_npu(tmp_path, monkeypatch, "__version__ = '2.5.1'\n", npu)
    avail = AscendPlatform.is_available()
    assert not avail.available and "no NPU is visible" in avail.reason and "2.5.1" in avail.reason


def test_driver_error_while_querying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> bool:
        raise RuntimeError("drvGetDevNum failed, error code 87")

    _fake_torch_npu(tmp_path, monkeypatch, "", types.SimpleNamespace(is_available=boom))
    avail = AscendPlatform.is_available()
    assert not avail.available and "driver error" in avail.reason and "87" in avail.reason


def test_visible_npus_are_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npu = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                                get_device_name=lambda i: "Ascend910B3")
    _fake_torch_npu(tmp_path, monkeypatch, "__version__ = '2.5.1'\n", npu)
    avail = AscendPlatform.is_available()
    assert avail.available and "2 x Ascend910B3" in avail.reason
    assert AscendPlatform.capabilities().dist_backend == "hccl"
    assert AscendPlatform.device_type == "npu"  # torch.device("npu") exists only once torch_npu is imported


def test_emulation_is_explicit_and_never_picked_by_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_ASCEND_EMULATE", "yes")
    bad = AscendPlatform.is_available()
    assert not bad.available and "SAGELLM_ASCEND_EMULATE" in bad.reason
    monkeypatch.setenv("SAGELLM_ASCEND_EMULATE", "cpu")
    ok = AscendPlatform.is_available()
    assert ok.available and "EMULATED" in ok.reason and "test-only" in ok.reason
    assert AscendPlatform().device == torch.device("cpu")
    reg = plugins.discover()
    assert reg.backends["ascend"].availability.available
    assert reg.auto_choice() is not None and reg.auto_choice().name != "ascend"  # type: ignore[union-attr]


# -- command line ----------------------------------------------------------------------------


def test_cli_backends_lists_ascend_as_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ascend"))
    assert "sagellm-ascend" in line and "unavailable" in line and "torch_npu is not installed" in line


def test_cli_backend_ascend_fails_naming_what_to_install(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--backend", "ascend", "--max-tokens", "1", "hello"]) == 2
    err = capsys.readouterr().err
    assert "backend 'ascend'" in err and "pip install torch-npu" in err
