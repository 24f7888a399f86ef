"""Without a GPU, the Triton kernels run in Triton's interpreter on the CPU (numerically the same
program, no CUDA), so CI checks every kernel against the torch reference too. Must be set before
the kernels are defined, hence here."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def load_benchmark() -> Iterator[Callable[[str], ModuleType]]:
    """Import ``benchmarks/<name>.py`` as module ``name`` (registered in ``sys.modules``, where
    dataclasses look their module up) for the test module, unregistered after it."""
    loaded: list[str] = []

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = mod
        loaded.append(name)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod

    try:
        yield load
    finally:
        for name in loaded:
            sys.modules.pop(name, None)


@pytest.fixture
def fresh_tile_tables(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No tile-table override in the environment and no table or lookup cached from another
    test, before and after the test."""
    from sagellm_cuda import gemv_tiles, moe_tiles

    for tiles in (gemv_tiles, moe_tiles):
        monkeypatch.delenv(tiles.ENV_VAR, raising=False)
        tiles.clear_cache()
    yield
    for tiles in (gemv_tiles, moe_tiles):
        tiles.clear_cache()


@pytest.fixture(autouse=True)
def _warmup_only_when_asked(request: pytest.FixtureRequest,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU every CUDA engine warms up by default (``sagellm.engine.warmup``: about a
    second each), and this suite builds about a hundred; here only engines with
    ``warmup=True`` do, except in tests marked ``default_warmup`` (``test_warmup_gpu.py``),
    which check the default itself. Step counts read by other tests stay those of their own
    requests."""
    if request.node.get_closest_marker("default_warmup") is not None:
        return
    from sagellm.engine import llm_engine

    monkeypatch.setattr(llm_engine, "use_warmup", lambda engine: engine.config.warmup is True)
