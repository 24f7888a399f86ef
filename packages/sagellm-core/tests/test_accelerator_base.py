"""The shared accelerator base calls ``torch.<device_type>`` and honours the emulation switch."""

from __future__ import annotations

import types

import pytest
import torch

from sagellm.backends.accelerator import Probe, TorchAcceleratorPlatform, emulation_mode
from sagellm.protocols import Capabilities


class FakePlatform(TorchAcceleratorPlatform):
    name = "fake"
    device_type = "fakedev"
    emulate_env = "SAGELLM_FAKE_EMULATE"
    vendor_name = "Fake"

    @classmethod
    def probe(cls) -> Probe:
        return Probe(False, "no Fake device here")

    @classmethod
    def device_capabilities(cls) -> Capabilities:
        return Capabilities(dtypes=(torch.float16,), default_dtype=torch.float16, priority=100)

    def make_kv_backend(self, spec, num_blocks):  # type: ignore[no-untyped-def]
        raise AssertionError("unused")

    make_attention_backend = make_comm_backend = make_kv_backend  # type: ignore[assignment]


@pytest.fixture
def fakedev(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[object, ...]]]:
    calls: list[tuple[str, tuple[object, ...]]] = []

    def rec(name: str, result: object = None):  # type: ignore[no-untyped-def]
        def f(*args: object) -> object:
            calls.append((name, args))
            return result
        return f

    mod = types.SimpleNamespace(
        set_device=rec("set_device"), mem_get_info=rec("mem_get_info", (3, 10)),
        synchronize=rec("synchronize"), max_memory_allocated=rec("max_memory_allocated", 7),
        reset_peak_memory_stats=rec("reset_peak_memory_stats"),
        get_device_name=rec("get_device_name", "Fake 9000"))
    monkeypatch.setattr(torch, "fakedev", mod, raising=False)
    monkeypatch.delenv("SAGELLM_FAKE_EMULATE", raising=False)
    return calls


def test_real_path_uses_the_torch_device_module(fakedev: list) -> None:  # type: ignore[type-arg]
    p = FakePlatform(device_index=2)
    p.set_device()
    info = p.memory_info()
    p.synchronize()
    p.reset_peak_memory()
    assert (info.free_bytes, info.total_bytes) == (3, 10)
    assert p.max_memory_allocated() == 7 and p.device_name() == "Fake 9000"
    assert all(args == (2,) for _, args in fakedev)
    assert [n for n, _ in fakedev][:3] == ["set_device", "mem_get_info", "synchronize"]


def test_emulation_maps_everything_onto_the_cpu(fakedev: list, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[type-arg]
    monkeypatch.setenv("SAGELLM_FAKE_EMULATE", "cpu")
    p = FakePlatform()
    assert p.emulated() and p.device == torch.device("cpu")
    p.set_device()
    p.synchronize()
    p.reset_peak_memory()
    assert p.max_memory_allocated() == 0 and p.memory_info().total_bytes > 0
    assert "emulation, test-only" in p.device_name()
    assert fakedev == []
    avail = FakePlatform.is_available()
    assert avail.available and "EMULATED" in avail.reason and "no Fake code runs" in avail.reason
    assert FakePlatform.capabilities().priority < 0  # auto never picks an emulated device


def test_outside_emulation_availability_and_capabilities_come_from_the_device(fakedev: list) -> None:  # type: ignore[type-arg]
    assert FakePlatform.is_available().reason == "no Fake device here"
    assert FakePlatform.capabilities().default_dtype == torch.float16


def test_bad_emulation_value_is_an_error_not_a_silent_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_FAKE_EMULATE", "gpu")
    with pytest.raises(ValueError, match="only \\(test-only\\) value is 'cpu'"):
        emulation_mode("SAGELLM_FAKE_EMULATE")
    assert not FakePlatform.emulated()
    assert "not understood" in FakePlatform.is_available().reason
