"""Plugin safety: the allow-list, broken and slow plugins, name clashes, start-up logging.

Each test installs throw-away distributions (dist-info + module) in a temp dir with
``sagellm.testing.make_distribution`` and discovers them for real through importlib.metadata.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from sagellm import plugins
from sagellm.testing import make_distribution

PLATFORM = """
    import torch
    from sagellm.backends.cpu import CpuPlatform
    from sagellm.hookspecs import hookimpl

    class P(CpuPlatform):
        name = {name!r}

        @classmethod
        def capabilities(cls):
            caps = super().capabilities()
            return type(caps)(caps.dtypes, caps.default_dtype, dist_backend="gloo", priority=-5)

    @hookimpl
    def sagellm_register_backends(register):
        register(P)
"""


def _plugin(root: Path, dist: str, backend: str, version: str = "0.1.0", prelude: str = "",
            ep: str | None = None) -> str:
    mod = f"plug_{backend}_{uuid.uuid4().hex[:8]}"
    make_distribution(root, dist, {ep or backend: mod},
                      {mod: prelude + textwrap.dedent(PLATFORM).format(name=backend)}, version=version)
    return mod


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SAGELLM_PLUGINS", raising=False)
    importlib.invalidate_caches()
    return tmp_path


def _discover() -> plugins.Registry:
    importlib.invalidate_caches()
    return plugins.discover()


def test_allowlist_by_entry_point_or_distribution_name(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plugin(site, "vendor-a", "alpha")
    _plugin(site, "vendor-b", "beta")
    monkeypatch.setenv("SAGELLM_PLUGINS", "cpu, vendor-b")
    reg = _discover()
    assert set(reg.backends) == {"cpu", "beta"}
    assert "alpha" in reg.skipped and "skipped: not in SAGELLM_PLUGINS" in reg.describe()
    with pytest.raises(plugins.BackendError, match="not in SAGELLM_PLUGINS"):
        reg.select("alpha")


def test_plugin_raising_on_import_is_reported_and_others_still_load(site: Path) -> None:
    _plugin(site, "vendor-broken", "broken", prelude="raise RuntimeError('vendor SDK 9.1 not found')\n",
            version="4.5.6")
    _plugin(site, "vendor-ok", "fine")
    reg = _discover()
    assert "fine" in reg.backends and "broken" not in reg.backends
    failure = next(f for f in reg.failures if f.entry_point == "broken")
    assert failure.distribution == "vendor-broken" and failure.version == "4.5.6"
    assert "RuntimeError: vendor SDK 9.1 not found" in failure.error and failure.traceback
    assert "vendor SDK 9.1 not found" in reg.describe()


def test_slow_importing_plugin_is_reported(site: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(plugins, "SLOW_IMPORT_SECONDS", 0.2)
    _plugin(site, "vendor-slow", "sluggish", prelude="import time\ntime.sleep(0.4)\n")
    with caplog.at_level(logging.WARNING, logger="sagellm.plugins"):
        reg = _discover()
    assert "sluggish" in reg.backends  # slow is reported, not rejected
    slow = next(s for s in reg.slow if s.entry_point == "sluggish")
    assert slow.seconds >= 0.4 and slow.distribution == "vendor-slow"
    assert "sluggish" in caplog.text and "to import" in caplog.text
    assert "slow import" in reg.describe()


def test_name_clash_is_rejected_naming_both_distributions(site: Path) -> None:
    _plugin(site, "vendor-one", "twin", version="1.0")
    _plugin(site, "vendor-two", "twin", version="2.0")
    reg = _discover()
    assert "twin" not in reg.backends
    with pytest.raises(plugins.BackendError) as err:
        reg.select("twin")
    assert "vendor-one 1.0" in str(err.value) and "vendor-two 2.0" in str(err.value)
    assert "CLASH: claimed by vendor-one 1.0 and vendor-two 2.0" in reg.describe()


def test_clash_under_different_entry_point_names_is_also_caught(site: Path) -> None:
    _plugin(site, "vendor-x", "gemini", ep="gemini-x")
    _plugin(site, "vendor-y", "gemini", ep="gemini-y")
    reg = _discover()
    assert {b.distribution for b in reg.clashes["gemini"]} == {"vendor-x", "vendor-y"}


def test_loaded_plugins_are_logged_at_start_up(site: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    _plugin(site, "vendor-log", "logged", version="3.2.1")
    monkeypatch.setattr(plugins, "_cached", None)
    importlib.invalidate_caches()
    with caplog.at_level(logging.INFO, logger="sagellm.plugins"):
        plugins.get_registry()
    assert "loaded sagellm plugin logged from vendor-log 3.2.1" in caplog.text
    assert "loaded sagellm plugin cpu from sagellm-core" in caplog.text


def test_cli_survives_broken_plugins_and_shows_each_problem(tmp_path: Path) -> None:
    """The real command, in a fresh process: nothing a plugin does stops `sagellm backends`."""
    _plugin(tmp_path, "vendor-broken", "broken", prelude="import no_such_vendor_sdk\n", version="7.8")
    _plugin(tmp_path, "vendor-one", "twin", version="1.0")
    _plugin(tmp_path, "vendor-two", "twin", version="2.0")
    _plugin(tmp_path, "vendor-ok", "fine")
    env = {k: v for k, v in os.environ.items() if k != "SAGELLM_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-m", "sagellm.cli", "backends"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "No module named 'no_such_vendor_sdk'" in out.stdout
    [broken] = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("broken ")]
    assert broken[1:4] == ["vendor-broken", "7.8", "broken"]  # the version column is filled
    assert "CLASH: claimed by vendor-one 1.0 and vendor-two 2.0" in out.stdout
    assert any(ln.startswith("fine ") and "available" in ln for ln in out.stdout.splitlines())
    assert "failed to load" in out.stderr  # warned on stderr as well
