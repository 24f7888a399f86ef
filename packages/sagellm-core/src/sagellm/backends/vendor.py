"""A vendor's torch extension (torch_npu, torch_mlu, ...) as a platform: how to find it, and the
platform built on it.

Vendor packages whose extension mirrors the CUDA device module of torch differ only in facts: the module's name,
what to install, what a failed import means, how to list visible devices, which fused-op module
to load, the collective backend. They state those facts in a :class:`VendorLibrary` and a
:class:`VendorPlatform` subclass; the probing, the emulation switch and the wiring live here.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch

from sagellm.backends.accelerator import Probe, TorchAcceleratorPlatform, emulation_mode
from sagellm.backends.torch_comm import TorchDistributedComm
from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.protocols import AttentionBackend, Capabilities, KVCacheSpec


@dataclass(frozen=True)
class VendorLibrary:
    """What sageLLM must know to find one vendor's torch extension and its devices.

    The strings are spliced into the reasons :meth:`probe` gives, so that each failure says what
    to do in the vendor's own terms.
    """

    #: The extension's module ("torch_npu"); importing it registers ``torch.<device_type>``.
    module: str
    device_type: str
    #: What to install when the module is missing.
    install_hint: str
    #: What a failed import means, e.g. which runtime is missing and how to make it visible.
    import_hint: str
    #: "Ascend driver": the subject of "... error while querying ...".
    driver: str
    #: "NPUs": what the driver was queried for.
    devices: str
    #: "NPU": in "no NPU is visible".
    device: str
    #: How to list devices outside sageLLM ("`npu-smi info`").
    list_command: str
    #: The variable that restricts visible devices; its value is quoted in the reason.
    visible_env: str
    #: The name used when the driver cannot name device 0.
    default_device_name: str
    #: The test-only switch that maps the device onto the CPU (``accelerator.emulation_mode``).
    emulate_env: str
    #: The module holding CPU models of the fused ops, loaded under emulation.
    emulated_ops: str
    #: A separate module of fused ops ("torch_mlu_ops"); None: the extension itself has them.
    ops_module: str | None = None

    def probe(self) -> Probe:
        """Import the extension and look for devices; every failure becomes a reason."""
        name = self.module
        if importlib.util.find_spec(name) is None:
            return Probe(False, f"{name} is not installed: {self.install_hint}")
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # missing vendor libraries surface here as ImportError/OSError
            return Probe(False, f"{name} is installed but failed to import ({type(exc).__name__}: "
                                f"{exc}); {self.import_hint}")
        version = getattr(module, "__version__", "?")
        try:
            dev = getattr(torch, self.device_type)
            count = int(dev.device_count()) if dev.is_available() else 0
        except Exception as exc:
            return Probe(False, f"{self.driver} error while querying {self.devices} with {name} "
                                f"{version}: {type(exc).__name__}: {exc}")
        if count == 0:
            return Probe(False, f"{name} {version} loaded but no {self.device} is visible (check "
                                f"{self.list_command} and "
                                f"{self.visible_env}={os.environ.get(self.visible_env, '')!r})")
        try:
            device_name = dev.get_device_name(0)
        except Exception:
            device_name = self.default_device_name
        reason = f"{count} x {device_name}, {name} {version}"
        if self.ops_module is not None:
            ops = self.ops_module if importlib.util.find_spec(self.ops_module) else (
                f"none (install {self.ops_module} for fused paged attention; using torch "
                f"reference attention)")
            reason += f"; fused ops: {ops}"
        return Probe(True, reason, module)

    def load_ops(self) -> ModuleType | None:
        """The fused ops: their CPU models under emulation, the vendor's module, or None (torch
        reference attention) when it cannot be loaded."""
        if emulation_mode(self.emulate_env) == "cpu":
            return importlib.import_module(self.emulated_ops)
        probe = self.probe()
        if not probe.ok:
            return None
        if self.ops_module is None:
            return probe.module
        if importlib.util.find_spec(self.ops_module) is None:
            return None
        try:
            return importlib.import_module(self.ops_module)
        except Exception:
            return None


class VendorPlatform(TorchAcceleratorPlatform):
    """A platform on a :class:`VendorLibrary`: the subclass names its parts, nothing more.

    ``device_type`` and ``emulate_env`` are taken from ``vendor`` when the subclass is defined.
    """

    vendor: ClassVar[VendorLibrary]
    #: The ``torch.distributed`` backend the extension registers ("hccl").
    dist_backend: ClassVar[str]
    kv_backend: ClassVar[type[TorchKVBackend]] = TorchKVBackend
    #: Built with the fused-op module of :meth:`VendorLibrary.load_ops` (None: reference only).
    attention_backend: ClassVar[Callable[[ModuleType | None], AttentionBackend]]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "vendor" in cls.__dict__:  # each fact once: the library's device and emulation switch
            cls.device_type = cls.vendor.device_type
            cls.emulate_env = cls.vendor.emulate_env

    @classmethod
    def probe(cls) -> Probe:
        return cls.vendor.probe()

    @classmethod
    def device_capabilities(cls) -> Capabilities:
        # float16 runs on every generation of these chips; bfloat16 only on newer ones, so it is
        # offered but not the default (pass --dtype bfloat16 where the chip has it).
        return Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32),
                            default_dtype=torch.float16, supports_graphs=False,
                            dist_backend=cls.dist_backend, priority=100)

    def make_kv_backend(self, spec: KVCacheSpec, num_blocks: int) -> TorchKVBackend:
        return self.kv_backend(spec, num_blocks, self.device)

    def make_attention_backend(self) -> AttentionBackend:
        return self.attention_backend(self.vendor.load_ops())

    def make_comm_backend(self, rank: int, world_size: int) -> TorchDistributedComm:
        # The vendor's collectives are torch.distributed's; only the device wait for exact
        # timings (``sync=True``) is the platform's own.
        return TorchDistributedComm(self.device, synchronize=self.synchronize)
