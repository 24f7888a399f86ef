"""Sessions: ``tests`` (CPU suite, coverage per package), ``lint``, ``gpu``, ``bench``.

``./dev test`` runs ``nox --no-venv -s tests`` inside the project's .venv. Each package's tests run
in their own pytest process with coverage of that package alone, which must reach
``COVERAGE_FLOOR`` percent of lines (the CUDA package too: without a GPU its Triton kernels run
in Triton's interpreter). Cross-package tests in ``tests/`` run last with coverage of everything,
reported but with no floor: they exercise seams between packages (discovery, the server end to
end), so their share of all packages' lines says nothing about any one package, and each package
already answers for its own lines. A run narrowed by pytest arguments (``./dev test -k foo``)
measures part of each package: add ``--cov-fail-under=0`` to it (the last value given wins).
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
nox.options.sessions = ["tests"]
#: Line coverage (percent) every package's own tests must reach.
COVERAGE_FLOOR = 80


def packages() -> list[tuple[str, str]]:
    """(distribution directory, import name) of every package under packages/."""
    out = []
    for pkg in sorted((ROOT / "packages").iterdir()):
        src = pkg / "src"
        if (pkg / "pyproject.toml").exists() and src.exists():
            names = [p.name for p in src.iterdir() if (p / "__init__.py").exists()]
            out.extend((pkg.name, n) for n in names)
    return out


def coverage_config(session: nox.Session, modules: list[str]) -> str:
    """A coverage config measuring ``modules`` in the test process and in every Python process
    it starts (real servers, engine processes, tensor-parallel workers)."""
    path = Path(session.create_tmp()) / f"coverage-{'-'.join(modules)}.toml"
    path.write_text(
        "[tool.coverage.run]\n"
        f"source_pkgs = {modules!r}\n"
        'patch = ["subprocess", "_exit"]\n'
        'concurrency = ["thread", "multiprocessing"]\n'
        "sigterm = true\n")
    return str(path)


@nox.session
def tests(session: nox.Session) -> None:
    """CPU test suite: one pytest run per package, then the cross-package tests."""
    extra = list(session.posargs)
    for dist, module in packages():
        tests_dir = ROOT / "packages" / dist / "tests"
        session.log(f"=== {dist} (coverage of {module}) ===")
        # Bare --cov: the packages come from the config's source_pkgs alone. Naming them on the
        # command line too lists each twice, and coverage then warns that the second copy
        # "was previously imported, but not measured" (CoverageWarning) on every run.
        session.run("pytest", str(tests_dir), "--cov", "--cov-report=term",
                    f"--cov-fail-under={COVERAGE_FLOOR}",
                    f"--cov-config={coverage_config(session, [module])}", "-m", "not gpu", *extra)
    session.log("=== cross-package tests ===")
    modules = [m for _, m in packages()]
    session.run("pytest", str(ROOT / "tests"), "--cov", "--cov-report=term",
                f"--cov-config={coverage_config(session, modules)}", "-m", "not gpu", *extra)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "packages", "tests", "noxfile.py")


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU tests (need CUDA): ``nox -s gpu`` on the GPU machine."""
    session.run("pytest", "-m", "gpu", "packages", "tests", *session.posargs)
