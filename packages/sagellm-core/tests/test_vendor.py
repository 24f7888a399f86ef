"""The shared vendor-extension probe and platform that Ascend and MLU only fill with facts."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from sagellm.backends import torch_attention
from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.backends.vendor import VendorLibrary, VendorPlatform
from sagellm.protocols import KVCacheSpec

LIB = VendorLibrary(
    module="torch_fakevendor", device_type="fakevendor", install_hint="pip install torch-fakevendor",
    import_hint="the FakeSDK runtime is missing", driver="Fake driver", devices="FPUs",
    device="FPU", list_command="`fpu-smi`", visible_env="FAKE_VISIBLE_DEVICES",
    default_device_name="Fake FPU", emulate_env="SAGELLM_FAKEVENDOR_EMULATE",
    emulated_ops="sagellm.backends.torch_attention", ops_module="torch_fakevendor_ops")


class FakeVendorPlatform(VendorPlatform):
    name = "fakevendor"
    vendor_name = "Fake"
    vendor = LIB
    dist_backend = "fccl"
    attention_backend = staticmethod(lambda ops: types.SimpleNamespace(ops=ops))  # type: ignore[assignment]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """Writes a fake vendor module (and, optionally, its ``torch.<device>``) for one test."""
    monkeypatch.delenv(LIB.emulate_env, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    names: set[str] = set()

    def put(name: str, source: str, dev: object | None = None) -> None:
        (tmp_path / f"{name}.py").write_text(source)
        sys.modules.pop(name, None)
        names.add(name)
        if dev is not None:
            monkeypatch.setattr(torch, LIB.device_type, dev, raising=False)

    yield put
    for name in names:
        sys.modules.pop(name, None)


def _devices(count: int) -> object:
    return types.SimpleNamespace(is_available=lambda: count > 0, device_count=lambda: count,
                                 get_device_name=lambda i: "FPU-9")


def test_each_failure_is_a_reason_in_the_vendors_terms(install: Callable[..., None],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    assert LIB.probe().reason == "torch_fakevendor is not installed: pip install torch-fakevendor"
    install("torch_fakevendor", "raise OSError('libfake.so')\n")
    assert LIB.probe().reason == ("torch_fakevendor is installed but failed to import (OSError: "
                                  "libfake.so); the FakeSDK runtime is missing")
    monkeypatch.setenv("FAKE_VISIBLE_DEVICES", "3")
    install("torch_fakevendor", "__version__ = '1.0'\n", _devices(0))
    assert LIB.probe().reason == ("torch_fakevendor 1.0 loaded but no FPU is visible (check "
                                  "`fpu-smi` and FAKE_VISIBLE_DEVICES='3')")

    def boom() -> bool:
        raise RuntimeError("code 87")

    monkeypatch.setattr(torch, "fakevendor", types.SimpleNamespace(is_available=boom))
    assert LIB.probe().reason == ("Fake driver error while querying FPUs with torch_fakevendor 1.0: "
                                  "RuntimeError: code 87")
    assert not FakeVendorPlatform.is_available().available


def test_visible_devices_and_the_optional_ops_module(install: Callable[..., None]) -> None:
    install("torch_fakevendor", "__version__ = '1.0'\n", _devices(2))
    found = LIB.probe()
    assert found.ok and found.reason.startswith("2 x FPU-9, torch_fakevendor 1.0; fused ops: none")
    assert LIB.load_ops() is None  # no ops module: the reference attention
    install("torch_fakevendor_ops", "raise ImportError('broken')\n")
    assert LIB.probe().reason.endswith("fused ops: torch_fakevendor_ops")
    assert LIB.load_ops() is None  # present but broken: still the reference, never a crash
    install("torch_fakevendor_ops", "OPS = 1\n")
    assert LIB.load_ops().OPS == 1  # type: ignore[union-attr]
    no_ops = VendorLibrary(**{**LIB.__dict__, "ops_module": None})
    assert no_ops.load_ops() is sys.modules["torch_fakevendor"]  # the extension holds the ops
    assert FakeVendorPlatform.capabilities().dist_backend == "fccl"


def test_emulation_wires_the_cpu_and_the_emulated_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    # stated once, on the library
    assert (FakeVendorPlatform.emulate_env, FakeVendorPlatform.device_type) == (LIB.emulate_env,
                                                                                 LIB.device_type)
    monkeypatch.setenv(LIB.emulate_env, "cpu")
    platform = FakeVendorPlatform()
    assert platform.device == torch.device("cpu")
    assert platform.make_attention_backend().ops is torch_attention  # type: ignore[attr-defined]
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, block_size=2, dtype=torch.float32)
    kv = platform.make_kv_backend(spec, 3)
    assert type(kv) is TorchKVBackend and kv.num_free_blocks == 3
