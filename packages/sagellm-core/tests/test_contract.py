"""The public backend contract: layer registry, RunnerContext-based runners, the builder's
layouts, the scheduler's hooks, and the import rules between packages."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sagellm.backends.cpu import CpuPlatform
from sagellm.config import EngineConfig
from sagellm.distributed.disagg import DisaggScheduler
from sagellm.engine.builder import EngineParts
from sagellm.engine.layout import Layout
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.scheduler import Budget, Scheduler
from sagellm.layers.activation import SiluAndMul
from sagellm.layers.norm import RMSNorm
from sagellm.layers.registry import (
    LayerKind,
    check_replacement,
    layer_overrides,
    swap_layers,
)
from sagellm.plugins import Registry
from sagellm.protocols import LayerRegister
from sagellm.runner import ModelRunner, RunnerContext, SequenceState, StepPlan, StepRunner
from sagellm.sampling_params import SamplingParams
from sagellm.testing.layers import check_layer_replacement

SRC = Path(__file__).resolve().parents[2]  # packages/
PROMPTS = [[5, 17, 42, 99, 123, 7, 250, 33], [200, 201, 9, 14, 77, 3, 90, 91, 92, 93, 94, 95]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


class PlainSiluAndMul(SiluAndMul):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up


class CountingRunner(ModelRunner):
    def __init__(self, ctx: RunnerContext) -> None:
        super().__init__(ctx)
        self.steps = 0

    def execute(self, plan: StepPlan) -> list[int]:
        self.steps += 1
        return super().execute(plan)


class SwappingPlatform(CpuPlatform):
    name = "cpu-swapping"

    def register_layers(self, register: LayerRegister) -> None:
        register(LayerKind.SILU_AND_MUL, PlainSiluAndMul)

    def make_model_runner(self, ctx: RunnerContext) -> CountingRunner:
        return CountingRunner(ctx)


def _engine(model_dir: Path, platform: CpuPlatform | None = None, **kw: object) -> LLMEngine:
    config = EngineConfig(model=str(model_dir), num_kv_blocks=64, **kw)  # type: ignore[arg-type]
    return LLMEngine(config, registry=Registry(), platform=platform or CpuPlatform())


def _generate(engine: LLMEngine) -> list[list[int]]:
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return [done[i] for i in ids]


# -- swappable layers ----------------------------------------------------------------------


def test_replacements_are_checked_against_the_declaration() -> None:
    assert check_replacement(LayerKind.SILU_AND_MUL, PlainSiluAndMul).base is SiluAndMul
    with pytest.raises(TypeError, match="must subclass"):
        check_replacement(LayerKind.RMS_NORM, PlainSiluAndMul)

    class WithState(RMSNorm):
        def __init__(self, hidden: int) -> None:
            super().__init__(hidden)

    with pytest.raises(TypeError, match="defines __init__"):
        check_replacement(LayerKind.RMS_NORM, WithState)
    with pytest.raises(TypeError, match="not a swappable layer kind"):
        check_replacement("silu_and_mul", PlainSiluAndMul)  # type: ignore[arg-type]

    class Twice(CpuPlatform):
        def register_layers(self, register: LayerRegister) -> None:
            register(LayerKind.SILU_AND_MUL, PlainSiluAndMul)
            register(LayerKind.SILU_AND_MUL, PlainSiluAndMul)

    with pytest.raises(ValueError, match="two replacements"):
        layer_overrides(Twice())
    assert layer_overrides(CpuPlatform()) == {}


def test_swap_changes_exact_core_classes_only() -> None:
    class OwnActivation(SiluAndMul):  # a model's own subclass keeps its code
        pass

    model = torch.nn.Sequential(SiluAndMul(), OwnActivation(), RMSNorm(8))
    assert swap_layers(model, {SiluAndMul: PlainSiluAndMul}) == 1
    assert [type(m) for m in model] == [PlainSiluAndMul, OwnActivation, RMSNorm]


def test_the_reference_check_catches_a_wrong_replacement() -> None:
    check_layer_replacement(LayerKind.SILU_AND_MUL, PlainSiluAndMul, torch.device("cpu"),
                            torch.float32, 2e-4)

    class Wrong(SiluAndMul):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate, up = x.chunk(2, -1)
            return torch.sigmoid(gate) * up

    with pytest.raises(AssertionError, match="Wrong"):
        check_layer_replacement(LayerKind.SILU_AND_MUL, Wrong, torch.device("cpu"),
                                torch.float32, 2e-4)


# -- the runner a platform builds ----------------------------------------------------------


def test_platform_runner_and_layers_are_used_and_tokens_unchanged(tiny_llama_dir: Path) -> None:
    want = _generate(_engine(tiny_llama_dir))
    engine = _engine(tiny_llama_dir, SwappingPlatform())
    assert isinstance(engine.runner, CountingRunner)
    assert engine.runner.kv is engine.kv and engine.runner.platform is engine.platform
    assert engine.runner.max_model_len == engine.max_model_len
    acts = [m for m in engine.model.modules() if isinstance(m, SiluAndMul)]
    assert acts and all(type(m) is PlainSiluAndMul for m in acts)
    assert _generate(engine) == want
    assert engine.runner.steps > 0


def test_a_v1_runner_override_is_not_called(tiny_llama_dir: Path) -> None:
    class OldPlatform(CpuPlatform):
        contract_version = 1

        def make_model_runner(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            raise AssertionError("the v1 calling convention is gone")

    with pytest.warns(DeprecationWarning, match="make_model_runner"):
        engine = _engine(tiny_llama_dir, OldPlatform())
    assert type(engine.runner) is ModelRunner


def test_a_runner_that_is_not_a_model_runner_is_refused(tiny_llama_dir: Path) -> None:
    class Odd(CpuPlatform):
        def make_model_runner(self, ctx: RunnerContext) -> ModelRunner | None:
            return object()  # type: ignore[return-value]

    with pytest.raises(TypeError, match="not a sagellm.runner.ModelRunner"):
        _engine(tiny_llama_dir, Odd())


# -- the builder: parts passed in, never replaced --------------------------------------------


class CappedScheduler(Scheduler):
    """One decision changed: resumed prefills take at most 4 tokens a step."""

    def _prefill_tokens(self, seq: SequenceState, budget: Budget) -> int:
        return min(super()._prefill_tokens(seq, budget), 4)


class RecordingLayout(Layout):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.built: list[object] = []

    def make_scheduler(self, parts: EngineParts) -> Scheduler:
        cfg = parts.config
        scheduler = CappedScheduler(parts.block_manager, cfg.max_num_seqs,
                                    cfg.max_num_batched_tokens, 8)
        self.built.append(scheduler)
        return scheduler

    def make_runner(self, parts: EngineParts, scheduler: Scheduler) -> StepRunner:
        assert scheduler is self.built[0]
        runner = CountingRunner(parts.runner_context())
        self.built.append(runner)
        return runner


def test_a_layout_supplies_scheduler_and_runner(tiny_llama_dir: Path) -> None:
    want = _generate(_engine(tiny_llama_dir))
    config = EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64)
    layout = RecordingLayout(config)
    engine = LLMEngine(config, registry=Registry(), platform=CpuPlatform(), layout=layout)
    assert [engine.scheduler, engine.runner] == layout.built
    assert engine.layout is layout and engine.workers is None
    rid = engine.add_request(PROMPTS[1], GREEDY)  # 12 tokens
    chunks = []
    for _ in range(2):
        plan = engine.scheduler.schedule()
        chunks += [op.num_tokens for op in plan.prefills]
        engine.scheduler.commit(plan)
    engine.abort_request(rid)
    assert chunks == [8, 4]  # admitted with 8 (the layout's budget), resumed with at most 4
    assert _generate(engine)[0] == want[0]


def test_disaggregation_overrides_decisions_not_the_algorithm() -> None:
    assert DisaggScheduler.schedule is Scheduler.schedule
    assert DisaggScheduler.commit is Scheduler.commit
    changed = {name for name, value in vars(DisaggScheduler).items()
               if callable(value) and name.startswith("_") and not name.startswith("__")}
    assert changed <= {name for name in vars(Scheduler)} | {"_prefill_victim"}


# -- import rules ---------------------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_engine_does_not_import_distributed() -> None:
    engine_dir = SRC / "sagellm-core" / "src" / "sagellm" / "engine"
    for path in engine_dir.glob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith("sagellm.distributed"), f"{path.name} imports {module}"


def test_no_private_engine_names_imported_from_outside() -> None:
    engine_dir = SRC / "sagellm-core" / "src" / "sagellm" / "engine"
    for path in [*SRC.glob("*/src/**/*.py"), *SRC.parent.glob("examples/*/src/**/*.py")]:
        if engine_dir in path.parents:
            continue
        for module, names in _imports(path):
            if module.startswith("sagellm.engine"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path} imports {private} from {module}"


def test_core_source_has_no_cuda_calls() -> None:
    for path in (SRC / "sagellm-core" / "src").rglob("*.py"):
        assert "torch.cuda" not in path.read_text(), path


def test_cpu_platform_transfers() -> None:
    p = CpuPlatform()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.empty_cache()
    t = p.to_device(torch.arange(3))
    assert p.fetch_ids(t) == [0, 1, 2]
