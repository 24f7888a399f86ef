"""CPU-runnable checks of the plugin: registration, availability reasons, graph sizes."""

from __future__ import annotations

import pluggy
import pytest
import torch

from sagellm import hookspecs
from sagellm.protocols import Availability, Platform
from sagellm_cuda import plugin
from sagellm_cuda.plugin import CudaPlatform, cuda_availability


def test_hook_registers_the_cuda_platform() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    pm.check_pending()
    found: list[type[Platform]] = []
    pm.hook.sagellm_register_backends(register=found.append)
    assert found == [CudaPlatform]
    assert CudaPlatform.name == "cuda" and CudaPlatform.device_type == "cuda"


def test_capabilities() -> None:
    caps = CudaPlatform.capabilities()
    assert caps.default_dtype == torch.bfloat16
    assert caps.supports_graphs and caps.dist_backend == "nccl"
    assert caps.priority > 0
    assert caps.async_steps


def test_availability_never_raises_and_explains() -> None:
    a = CudaPlatform.is_available()
    assert isinstance(a, Availability)
    assert a.reason  # yes or no, it says something
    if not torch.cuda.is_available():
        assert not a.available


def test_reason_without_a_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    a = cuda_availability()
    assert not a.available and "without CUDA" in a.reason


def test_reason_without_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    a = cuda_availability()
    assert not a.available and "no CUDA device" in a.reason and "CUDA_VISIBLE_DEVICES" in a.reason


def test_reason_on_a_driver_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> int:
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", broken)
    a = cuda_availability()
    assert not a.available and a.reason.startswith("CUDA driver error") and "insufficient" in a.reason


def test_any_unexpected_error_becomes_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    class Weird:
        def __getattr__(self, name: str) -> object:
            raise KeyError(name)

    monkeypatch.setattr(plugin, "torch", Weird())
    a = cuda_availability()
    assert not a.available and "CUDA check failed" in a.reason


def test_registry_discovers_cuda_when_installed() -> None:
    from sagellm.plugins import get_registry

    reg = get_registry(refresh=True)
    if "cuda" not in reg.backends:
        pytest.skip("sagellm-cuda is not installed as a distribution here")
    info = reg.backends["cuda"]
    assert info.platform is CudaPlatform
    assert info.availability.available == torch.cuda.is_available() or not info.availability.available


def test_graph_batch_sizes() -> None:
    pytest.importorskip("triton")
    from sagellm_cuda.graphs import graph_batch_sizes

    assert graph_batch_sizes(256)[:5] == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(256)[-1] == 256 and len(graph_batch_sizes(256)) == 20
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(3) == [1, 2, 3]


def test_decode_split_heuristic() -> None:
    pytest.importorskip("triton")
    from sagellm_cuda.attention import decode_num_splits

    assert decode_num_splits(256, 2, 4096) == 1
    assert decode_num_splits(1, 2, 64) == 1  # one tile: nothing to split
    assert 1 < decode_num_splits(1, 2, 4096) <= 128
    assert decode_num_splits(16, 2, 4096) > decode_num_splits(64, 2, 4096)


class _Props:
    def __init__(self, name: str, major: int, minor: int) -> None:
        self.name, self.major, self.minor = name, major, minor


def _one_device(monkeypatch: pytest.MonkeyPatch, props: _Props) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: props.name)


def test_a_usable_device_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    _one_device(monkeypatch, _Props("NVIDIA H200", 9, 0))
    a = cuda_availability()
    assert a.available and "1 device(s): NVIDIA H200" in a.reason and "CUDA 12.8" in a.reason
    assert CudaPlatform.is_available().available


def test_a_device_older_than_volta_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    _one_device(monkeypatch, _Props("Tesla P100", 6, 0))
    a = cuda_availability()
    assert not a.available and "compute capability 6.0" in a.reason and "7.0 or newer" in a.reason


def test_without_triton_the_reason_says_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_triton(name: str, *args: object, **kwargs: object) -> object:
        if name == "triton":
            raise ImportError("No module named 'triton'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    _one_device(monkeypatch, _Props("NVIDIA H200", 9, 0))
    monkeypatch.setattr(builtins, "__import__", no_triton)
    a = cuda_availability()
    assert not a.available and "triton is not importable" in a.reason and "pip install triton" in a.reason


def test_cuda_build_without_a_visible_device_but_a_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch sees CUDA but no device is visible (an empty CUDA_VISIBLE_DEVICES, say)."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    a = cuda_availability()
    assert not a.available and a.reason == "no CUDA device visible"
