"""Backend discovery and selection.

Discovery walks the ``sagellm.backends`` entry points, honours the ``SAGELLM_PLUGINS`` allow-list,
registers each plugin module with a pluggy ``PluginManager`` and collects the platforms it hands
over. A plugin that fails to import or to register is recorded with its error and skipped; two
platforms claiming one name make that name unusable and the error names both distributions.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field

import pluggy

from sagellm import hookspecs
from sagellm.protocols import CONTRACT_VERSION, OLDEST_CONTRACT_VERSION, Availability, Platform

logger = logging.getLogger(__name__)

ALLOWLIST_ENV = "SAGELLM_PLUGINS"
#: Import time above which a plugin is reported as slow.
SLOW_IMPORT_SECONDS = 2.0
#: Where users get the backends this project maintains.
KNOWN_PACKAGES = {"cuda": "sagellm-cuda", "ascend": "sagellm-ascend", "mlu": "sagellm-mlu",
                  "cpu": "sagellm-core"}


class BackendError(RuntimeError):
    """A backend cannot be selected; the message says what to do."""


@dataclass
class BackendInfo:
    name: str
    platform: type[Platform]
    distribution: str
    version: str
    entry_point: str
    availability: Availability = field(default_factory=lambda: Availability.no("not checked"))
    priority: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "entry_point": self.entry_point,
            "available": self.availability.available,
            "reason": self.availability.reason,
            "priority": self.priority,
        }


@dataclass
class PluginFailure:
    entry_point: str
    distribution: str
    error: str
    traceback: str = ""
    #: The distribution's version from its metadata (what to report when filing a bug).
    version: str = ""


@dataclass
class PluginLoad:
    entry_point: str
    distribution: str
    version: str
    seconds: float


@dataclass
class Registry:
    backends: dict[str, BackendInfo] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    clashes: dict[str, list[BackendInfo]] = field(default_factory=dict)
    loaded: list[PluginLoad] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    slow: list[PluginLoad] = field(default_factory=list)
    pm: pluggy.PluginManager | None = None

    def auto_choice(self) -> BackendInfo | None:
        """The backend ``auto`` picks: the available one with the highest priority."""
        ready = [b for b in self.backends.values() if b.availability.available]
        if not ready:
            return None
        return max(ready, key=lambda b: (b.priority, b.name != "cpu", b.name))

    def select(self, name: str = "auto") -> BackendInfo:
        """Resolve ``auto`` or a backend name, or raise :class:`BackendError` saying why not."""
        if name == "auto":
            choice = self.auto_choice()
            if choice is None:
                raise BackendError("no usable backend found:\n" + self.describe())
            return choice
        if name in self.clashes:
            dists = ", ".join(f"{b.distribution} {b.version} ({b.entry_point})" for b in self.clashes[name])
            raise BackendError(f"backend name {name!r} is claimed by several plugins: {dists}; "
                               f"uninstall one or limit {ALLOWLIST_ENV}")
        info = self.backends.get(name)
        if info is None:
            for f in self.failures:
                if f.entry_point == name or f.distribution == KNOWN_PACKAGES.get(name):
                    raise BackendError(f"backend {name!r} is installed ({f.distribution}) but its "
                                       f"plugin failed to load: {f.error}")
            if name in self.skipped:
                raise BackendError(f"backend {name!r} is installed but not in {ALLOWLIST_ENV}="
                                   f"{os.environ.get(ALLOWLIST_ENV, '')!r}")
            pkg = KNOWN_PACKAGES.get(name, f"a package that provides the {name!r} backend")
            hint = f"pip install {pkg}" if name in KNOWN_PACKAGES else f"install {pkg}"
            have = ", ".join(sorted(self.backends)) or "none"
            raise BackendError(f"backend {name!r} is not installed ({hint}); installed: {have}")
        if not info.availability.available:
            raise BackendError(f"backend {name!r} ({info.distribution} {info.version}) is installed "
                               f"but cannot run here: {info.availability.reason}")
        return info

    def describe(self) -> str:
        """The table ``sagellm backends`` prints."""
        lines = [f"{'name':<10} {'distribution':<24} {'version':<10} {'status':<11} reason"]
        for b in sorted(self.backends.values(), key=lambda b: b.name):
            status = "available" if b.availability.available else "unavailable"
            lines.append(f"{b.name:<10} {b.distribution:<24} {b.version:<10} {status:<11} "
                         f"{b.availability.reason}")
        for name, infos in sorted(self.clashes.items()):
            dists = " and ".join(f"{b.distribution} {b.version}" for b in infos)
            lines.append(f"{name:<10} CLASH: claimed by {dists}")
        for f in self.failures:
            lines.append(f"{f.entry_point:<10} {f.distribution:<24} {f.version:<10} {'broken':<11} "
                         f"{f.error}")
        for s in self.skipped:
            lines.append(f"{s:<10} skipped: not in {ALLOWLIST_ENV}")
        for s in self.slow:
            lines.append(f"{s.entry_point:<10} slow import: {s.seconds:.1f} s")
        choice = self.auto_choice()
        lines.append(f"auto -> {choice.name if choice else 'nothing (no backend is usable)'}")
        return "\n".join(lines)


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def _allowlist() -> set[str] | None:
    raw = os.environ.get(ALLOWLIST_ENV)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ("unknown", "")
    return (dist.metadata["Name"] or "unknown", dist.version or "")


def _safe_availability(platform: type[Platform]) -> Availability:
    try:
        avail = platform.is_available()
        if not isinstance(avail, Availability):
            return Availability.no(f"is_available() returned {type(avail).__name__}, not Availability")
        return avail
    except Exception as exc:  # a plugin must never break discovery
        return Availability.no(f"is_available() raised {type(exc).__name__}: {exc}")


def discover(entry_points: Iterable[md.EntryPoint] | None = None,
             pm: pluggy.PluginManager | None = None) -> Registry:
    """Load every allowed backend plugin and return what was found, including failures."""
    if entry_points is None:
        entry_points = md.entry_points(group=hookspecs.ENTRY_POINT_GROUP)
    pm = pm or make_plugin_manager()
    allow = _allowlist()
    reg = Registry(pm=pm)
    seen: dict[str, tuple[str, str]] = {}
    for ep in sorted(entry_points, key=lambda e: e.name):
        dist, version = _dist_of(ep)
        if allow is not None and ep.name not in allow and dist not in allow:
            reg.skipped.append(ep.name)
            continue
        if ep.name in seen and seen[ep.name] == (dist, ep.value):
            continue  # the same distribution seen twice on sys.path
        seen[ep.name] = (dist, ep.value)
        t0 = time.perf_counter()
        try:
            module = ep.load()
            pm.register(module, name=f"{dist}:{ep.name}")
        except Exception as exc:
            reg.failures.append(PluginFailure(ep.name, dist, f"{type(exc).__name__}: {exc}",
                                              traceback.format_exc(), version))
            logger.warning("sagellm plugin %r from %s failed to load: %s", ep.name, dist, exc)
            continue
        load = PluginLoad(ep.name, dist, version, time.perf_counter() - t0)
        reg.loaded.append(load)
        if load.seconds > SLOW_IMPORT_SECONDS:
            reg.slow.append(load)
            logger.warning("sagellm plugin %r from %s took %.1f s to import", ep.name, dist, load.seconds)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=f"{dist}:{ep.name}")
            reg.failures.append(PluginFailure(ep.name, dist, f"invalid hook implementation: {exc}",
                                              version=version))
            reg.loaded.pop()
            continue
    for impl in pm.hook.sagellm_register_backends.get_hookimpls():
        dist, _, ep_name = impl.plugin_name.partition(":")
        version = next((p.version for p in reg.loaded
                        if p.entry_point == ep_name and p.distribution == dist), "")
        found: list[type[Platform]] = []
        try:
            impl.function(register=found.append)
        except Exception as exc:
            reg.failures.append(PluginFailure(ep_name, dist, f"sagellm_register_backends raised "
                                              f"{type(exc).__name__}: {exc}", traceback.format_exc(),
                                              version))
            continue
        for platform in found:
            _add_platform(reg, platform, dist, version, ep_name)
    return reg


def _add_platform(reg: Registry, platform: type[Platform], dist: str, version: str, ep: str) -> None:
    if not (isinstance(platform, type) and issubclass(platform, Platform)):
        reg.failures.append(PluginFailure(ep, dist, f"registered {platform!r}, not a Platform subclass",
                                          version=version))
        return
    if getattr(platform, "contract_version", CONTRACT_VERSION) > CONTRACT_VERSION:
        reg.failures.append(PluginFailure(ep, dist, f"{platform.__name__} needs backend contract "
                                          f"v{platform.contract_version}; this sagellm-core has "
                                          f"v{CONTRACT_VERSION}: upgrade sagellm-core",
                                          version=version))
        return
    if getattr(platform, "contract_version", CONTRACT_VERSION) < OLDEST_CONTRACT_VERSION:
        reg.failures.append(PluginFailure(ep, dist, f"{platform.__name__} targets backend contract "
                                          f"v{platform.contract_version}; this sagellm-core supports "
                                          f"v{OLDEST_CONTRACT_VERSION} to v{CONTRACT_VERSION}: "
                                          f"upgrade {dist}", version=version))
        return
    avail = _safe_availability(platform)
    try:
        priority = platform.capabilities().priority
    except Exception as exc:
        avail, priority = Availability.no(f"capabilities() raised {type(exc).__name__}: {exc}"), 0
    info = BackendInfo(platform.name, platform, dist, version, ep, avail, priority)
    if platform.name in reg.clashes:
        reg.clashes[platform.name].append(info)
    elif platform.name in reg.backends:
        reg.clashes[platform.name] = [reg.backends.pop(platform.name), info]
        logger.error("backend name %r claimed by %s and %s", platform.name,
                     reg.clashes[platform.name][0].distribution, dist)
    else:
        reg.backends[platform.name] = info


_cached: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry (discovered once)."""
    global _cached
    if _cached is None or refresh:
        _cached = discover()
        for load in _cached.loaded:
            logger.info("loaded sagellm plugin %s from %s %s (%.2f s)", load.entry_point,
                        load.distribution, load.version, load.seconds)
    return _cached
