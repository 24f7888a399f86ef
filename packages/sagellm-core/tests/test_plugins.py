"""Discovery with throw-away distributions installed into a temporary directory."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sagellm import plugins
from sagellm.plugins import BackendError, discover

PLATFORM_SRC = '''
from __future__ import annotations
import torch
from sagellm import hookimpl
from sagellm.backends.cpu import CpuPlatform
from sagellm.protocols import Availability, Capabilities

class {cls}(CpuPlatform):
    name = "{backend}"

    @classmethod
    def is_available(cls):
        return {avail}

    @classmethod
    def capabilities(cls):
        return Capabilities(dtypes=(torch.float32,), default_dtype=torch.float32, priority={priority})

@hookimpl
def sagellm_register_backends(register):
    register({cls})
'''


def make_dist(root: Path, dist: str, module: str, backend: str, *, source: str | None = None,
              avail: str = "Availability.yes('fake device')", priority: int = 5) -> None:
    """Write an installed distribution (dist-info + module) into ``root``."""
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[sagellm.backends]\n{backend} = {module}\n")
    code = source if source is not None else PLATFORM_SRC.format(
        cls=f"P{abs(hash(module)) % 10**6}", backend=backend, avail=avail, priority=priority)
    (root / f"{module}.py").write_text(textwrap.dedent(code))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(plugins.ALLOWLIST_ENV, raising=False)
    yield tmp_path
    importlib.invalidate_caches()
    for name in list(sys.modules):
        if name.startswith("fakeplug_"):
            del sys.modules[name]


def test_builtin_cpu_backend_is_found_through_its_entry_point(site: Path) -> None:
    reg = discover()
    cpu = reg.backends["cpu"]
    assert cpu.distribution == "sagellm-core" and cpu.entry_point == "cpu"
    assert cpu.availability.available
    assert reg.auto_choice() is not None


def test_third_party_backend_is_discovered_and_preferred_by_auto(site: Path) -> None:
    make_dist(site, "fake-accel", "fakeplug_accel", "accel")
    reg = discover()
    info = reg.select("accel")
    assert (info.distribution, info.version) == ("fake-accel", "1.2.3")
    assert reg.select("auto").name == "accel"  # priority 5 beats the CPU's 0
    assert "accel" in reg.describe() and "auto -> accel" in reg.describe()


def test_allowlist_limits_what_loads(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "fake-accel", "fakeplug_allow", "accel")
    monkeypatch.setenv(plugins.ALLOWLIST_ENV, "cpu")
    reg = discover()
    assert set(reg.backends) == {"cpu"}
    assert "accel" in reg.skipped
    with pytest.raises(BackendError, match="not in SAGELLM_PLUGINS"):
        reg.select("accel")
    monkeypatch.setenv(plugins.ALLOWLIST_ENV, "fake-accel")  # distribution names work too
    assert set(discover().backends) == {"accel"}


def test_plugin_that_raises_on_import_is_reported_not_fatal(site: Path) -> None:
    make_dist(site, "fake-broken", "fakeplug_broken", "broken",
              source="raise RuntimeError('driver exploded')\n")
    reg = discover()
    assert "cpu" in reg.backends
    [failure] = [f for f in reg.failures if f.entry_point == "broken"]
    assert failure.distribution == "fake-broken" and "driver exploded" in failure.error
    with pytest.raises(BackendError, match="failed to load: RuntimeError: driver exploded"):
        reg.select("broken")
    assert "broken" in reg.describe()


def test_misspelled_hook_is_rejected_by_check_pending(site: Path) -> None:
    make_dist(site, "fake-typo", "fakeplug_typo", "typo", source=(
        "from sagellm import hookimpl\n"
        "@hookimpl\ndef sagellm_register_backend(register):\n    pass\n"))
    reg = discover()
    [failure] = [f for f in reg.failures if f.entry_point == "typo"]
    assert "invalid hook implementation" in failure.error


def test_name_clash_is_an_error_naming_both_distributions(site: Path) -> None:
    make_dist(site, "fake-one", "fakeplug_one", "dup")
    make_dist(site, "fake-two", "fakeplug_two", "dup")
    reg = discover()
    assert "dup" not in reg.backends
    with pytest.raises(BackendError) as err:
        reg.select("dup")
    assert "fake-one" in str(err.value) and "fake-two" in str(err.value)


def test_missing_backend_names_the_package_to_install(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(plugins.KNOWN_PACKAGES, "tpu", "sagellm-tpu")
    reg = discover()
    with pytest.raises(BackendError, match="not installed \\(pip install sagellm-tpu\\)"):
        reg.select("tpu")
    with pytest.raises(BackendError, match="'nosuch' is not installed"):
        reg.select("nosuch")


def test_unavailable_backend_gives_the_reason(site: Path) -> None:
    make_dist(site, "fake-off", "fakeplug_off", "off", avail="Availability.no('no device found')")
    reg = discover()
    with pytest.raises(BackendError, match="cannot run here: no device found"):
        reg.select("off")
    assert reg.select("auto").name != "off"


def test_is_available_that_raises_is_contained(site: Path) -> None:
    make_dist(site, "fake-raise", "fakeplug_raise", "raiser", avail="1 / 0")
    reg = discover()
    assert not reg.backends["raiser"].availability.available
    assert "ZeroDivisionError" in reg.backends["raiser"].availability.reason


def test_cli_backends_lists_distribution_version_and_auto(site: Path) -> None:
    make_dist(site, "fake-accel", "fakeplug_cli", "accel")
    out = subprocess.run([sys.executable, "-m", "sagellm.cli", "backends"], capture_output=True,
                         text=True, env={**_env(site)}, check=True).stdout
    assert "fake-accel" in out and "1.2.3" in out and "auto -> accel" in out
    assert "sagellm-core" in out


def _env(site: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env.pop(plugins.ALLOWLIST_ENV, None)
    return env
