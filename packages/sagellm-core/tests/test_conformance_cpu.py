"""The built-in CPU backend passes the conformance suite every backend runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sagellm.backends.cpu import CpuPlatform
from sagellm.testing import BackendSuite


class TestCpu(BackendSuite):
    platform_cls = CpuPlatform


def test_kit_without_pytest_names_the_extra() -> None:
    code = ("import sys\n"
            "sys.modules['pytest'] = None  # as if pytest were not installed\n"
            "try:\n"
            "    import sagellm.testing\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'pip install "sagellm-core[testing]"' in out.stdout


def test_suite_uses_no_deprecated_pytest_patterns(tmp_path: Path) -> None:
    """A backend author's one-line subclass, run outside this repository's warning filters."""
    (tmp_path / "test_mine.py").write_text(
        "from sagellm.backends.cpu import CpuPlatform\n"
        "from sagellm.testing import BackendSuite\n\n"
        "class TestMine(BackendSuite):\n"
        "    platform_cls = CpuPlatform\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-W", "error::DeprecationWarning", "--rootdir", str(tmp_path), "-k",
                          "contract or factories or kv_allocate", str(tmp_path / "test_mine.py")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "warning" not in out.stdout.lower()
