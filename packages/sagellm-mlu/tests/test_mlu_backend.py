"""MLU-specific behaviour: vendor KV layout, which path attention takes, availability, CLI."""

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
from sagellm.protocols import KVCacheSpec
from sagellm.testing import make_paged_case
from sagellm_mlu import _emulated_ops
from sagellm_mlu.attention import MluAttentionBackend
from sagellm_mlu.kv import MluKVBackend
from sagellm_mlu.platform import MluPlatform

SCALE = 0.25


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("SAGELLM_MLU_EMULATE", raising=False)
    monkeypatch.setattr(plugins, "_cached", None)
    yield
    sys.modules.pop("torch_mlu", None)
    importlib.invalidate_caches()


def test_kv_pool_is_stored_in_the_vendor_layout() -> None:
    spec = KVCacheSpec(num_layers=1, num_kv_heads=3, head_dim=8, block_size=4, dtype=torch.float32)
    kv = MluKVBackend(spec, 5, torch.device("cpu"))
    (k, _), (nk, _) = kv.kv_caches()[0], kv.native_caches()[0]
    assert k.shape == (5, 4, 3, 8) and nk.shape == (5, 3, 4, 8) and nk.is_contiguous()
    k[2, 1, 0] = 7.0  # block 2, offset 1, head 0 in contract coordinates
    assert nk[2, 0, 1].eq(7).all()


def _run_all(attn: MluAttentionBackend) -> list[float]:
    errors = []
    for seq_lens, ctx in (([6, 3], [0, 0]), ([9, 5], [4, 2]), ([7, 2], [6, 1])):
        case = make_paged_case(seq_lens, ctx, 4, 2, 16, 4, seed=len(errors))
        spec = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32)
        kc, vc = MluKVBackend(spec, case.num_blocks, torch.device("cpu")).kv_caches()[0]
        for i, c in enumerate(ctx):
            attn.write_kv(case.keys[i][:c], case.values[i][:c], kc, vc,
                          torch.tensor(case.slots(i, 0, c)))
        key = torch.cat([case.keys[i][c:] for i, c in enumerate(ctx)])
        value = torch.cat([case.values[i][c:] for i, c in enumerate(ctx)])
        slots = torch.tensor([s for i, c in enumerate(ctx) for s in case.slots(i, c, seq_lens[i])])
        attn.write_kv(key, value, kc, vc, slots)
        query = torch.cat(case.queries)
        cpu = torch.device("cpu")
        if all(s - c == 1 for s, c in zip(seq_lens, ctx, strict=True)):
            out = attn.decode(query, kc, vc, case.decode_metadata(cpu), SCALE)
        else:
            out = attn.prefill(query, key, value, kc, vc, case.prefill_metadata(cpu), SCALE)
        errors.append(float((out.double() - case.expected(SCALE)).abs().max()))
    return errors


def test_emulation_goes_through_the_torch_mlu_ops_call_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_MLU_EMULATE", "cpu")
    calls: list[str] = []
    for name in ("reshape_paged_cache", "flash_attention", "single_query_cached_kv_attn"):
        real = getattr(_emulated_ops, name)
        monkeypatch.setattr(_emulated_ops, name,
                            lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    attn = MluPlatform().make_attention_backend()
    assert all(e < 1e-4 for e in _run_all(attn))
    assert attn.fallback_reasons == {}
    # prefix prefill stays on the reference by design; the other two call the fused ops
    assert calls.count("flash_attention") == 1 and calls.count("single_query_cached_kv_attn") == 1
    assert calls.count("reshape_paged_cache") == 9  # two prefixes + the new tokens, per case


def test_without_torch_mlu_ops_everything_uses_the_reference() -> None:
    attn = MluAttentionBackend(None)
    assert all(e < 1e-4 for e in _run_all(attn))


def test_a_failing_fused_op_falls_back_and_stays_off() -> None:
    def broken(*args: Any) -> Any:
        raise RuntimeError("CNNL_STATUS_NOT_SUPPORTED")

    ops = types.SimpleNamespace(reshape_paged_cache=broken, flash_attention=broken,
                                single_query_cached_kv_attn=broken)
    attn = MluAttentionBackend(ops)  # type: ignore[arg-type]
    assert all(e < 1e-4 for e in _run_all(attn))
    assert set(attn.fallback_reasons) == {"write_kv", "prefill", "decode"}


def _fake_torch_mlu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str,
                    mlu: object | None = None) -> None:
    (tmp_path / "torch_mlu.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("torch_mlu", None)
    if mlu is not None:
        monkeypatch.setattr(torch, "mlu", mlu, raising=False)


def test_without_torch_mlu_the_reason_says_what_to_install() -> None:
    avail = MluPlatform.is_available()
    assert not avail.available and "torch_mlu is not installed" in avail.reason
    assert "install torch_mlu" in avail.reason


def test_torch_mlu_that_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torch_mlu(tmp_path, monkeypatch, "raise OSError('libcnrt.so: cannot open shared object')\n")
    avail = MluPlatform.is_available()
    assert not avail.available and "failed to import" in avail.reason and "libcnrt.so" in avail.reason


def test_no_visible_mlu_and_driver_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torch_mlu(tmp_path, monkeypatch, "__version__ = '1.24.0'\n",
                    types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0))
    avail = MluPlatform.is_available()
    assert not avail.available and "no MLU is visible" in avail.reason

    def boom() -> bool:
        raise RuntimeError("cnrtGetDeviceCount failed: CNRT_RET_ERR_NODEV")

    monkeypatch.setattr(torch, "mlu", types.SimpleNamespace(is_available=boom), raising=False)
    avail = MluPlatform.is_available()
    assert not avail.available and "driver error" in avail.reason and "NODEV" in avail.reason


def test_visible_mlus_are_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torch_mlu(tmp_path, monkeypatch, "__version__ = '1.24.0'\n",
                    types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 4,
                                          get_device_name=lambda i: "MLU370-X8"))
    avail = MluPlatform.is_available()
    assert avail.available and "4 x MLU370-X8" in avail.reason and "fused ops" in avail.reason
    assert MluPlatform.capabilities().dist_backend == "cncl"


def test_emulation_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_MLU_EMULATE", "1")
    assert "SAGELLM_MLU_EMULATE" in MluPlatform.is_available().reason
    monkeypatch.setenv("SAGELLM_MLU_EMULATE", "cpu")
    ok = MluPlatform.is_available()
    assert ok.available and "EMULATED" in ok.reason and "test-only" in ok.reason
    assert MluPlatform.capabilities().priority < 0  # auto never picks an emulation


def test_cli_backends_and_backend_mlu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backends"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("mlu"))
    assert "sagellm-mlu" in line and "unavailable" in line and "torch_mlu is not installed" in line
    assert main(["generate", "--backend", "mlu", "--max-tokens", "1", "hello"]) == 2
    err = capsys.readouterr().err
    assert "backend 'mlu'" in err and "install torch_mlu" in err
