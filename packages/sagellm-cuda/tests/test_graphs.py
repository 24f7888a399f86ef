"""The graph runner's host logic on the CPU: which steps replay which graph, bucket padding, the
staging buffers and sampling from a graph's outputs.

The runner is :class:`CudaGraphModelRunner` with the Triton kernels (interpreted) and a capture
whose replay re-runs the captured forward (``cuda_on_cpu.py``); tokens are compared with core's
CPU backend. Graph capture itself is checked on the GPU (``test_correctness.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sagellm.backends.cpu import CpuPlatform
from sagellm.config import EngineConfig
from sagellm.engine.llm_engine import LLMEngine
from sagellm.engine.sequence import SequenceState
from sagellm.plugins import Registry
from sagellm.protocols import NO_BLOCK
from sagellm.sampling_params import SamplingParams
from sagellm.testing.structured import OnlyToken
from sagellm.testing.tiny_model import make_tiny_llama
from sagellm_cuda.graphs import CudaGraphModelRunner
from sagellm_cuda.plugin import NO_FUSION_ENV

# The root config uses --import-mode=importlib, which does not put test directories on sys.path.
sys.path.insert(0, str(Path(__file__).parent))
from cuda_on_cpu import CudaPartsOnCpu, ReplayedForward  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="hosted on the CPU only where there is no GPU")

BLOCK = 4


@pytest.fixture(autouse=True)
def _core_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Core's norm, activation and rotary layers: the fused ones are checked elsewhere
    (``test_layers.py``, the conformance suite) and would triple the interpreted launches."""
    monkeypatch.setenv(NO_FUSION_ENV, "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _engine(platform: object, model: Path, **kw: Any) -> LLMEngine:
    settings: dict[str, Any] = dict(model=str(model), dtype="float32", block_size=BLOCK,
                                    num_kv_blocks=64, max_num_seqs=4, max_model_len=96,
                                    max_num_batched_tokens=64, enable_prefix_caching=False)
    settings.update(kw)
    return LLMEngine(EngineConfig(**settings), registry=Registry(), platform=platform)  # type: ignore[arg-type]


def _run(engine: LLMEngine, prompts: list[list[int]],
         params: SamplingParams | list[SamplingParams], arrive_every: int = 0) -> list[list[int]]:
    """Generate for ``prompts``: all at once, or with ``arrive_every`` > 0 one prompt joining
    every that many steps (so prompts prefill alone or next to decodes, and decodes run at
    several batch sizes). ``params``: one for all prompts, or one per prompt."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    pending, done = list(zip(prompts, per_prompt)), {}
    ids = [] if arrive_every else [engine.add_request(p, sp) for p, sp in pending]
    if not arrive_every:
        pending.clear()
    while pending or engine.has_unfinished_requests():
        if pending:
            ids.append(engine.add_request(*pending.pop(0)))
        for _ in range(max(arrive_every, 1)):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.token_ids)
    return [done[i] for i in ids]


def _prompts(*lens: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(sum(lens))
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]


GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


def _runner(engine: LLMEngine) -> CudaGraphModelRunner:
    runner = engine.runner
    assert isinstance(runner, CudaGraphModelRunner)
    return runner


def test_buckets_follow_the_config(tiny: Path) -> None:
    runner = _runner(_engine(CudaPartsOnCpu(), tiny, max_num_seqs=20, max_model_len=96))
    assert runner.graph_sizes == [1, 2, 4, 8, 16, 20] and set(runner.graphs) == {1, 2, 4, 8, 16, 20}
    # Prefill buckets stop at the step budget (64 tokens) and at the model length.
    assert runner.prefill_sizes == [32, 64] and set(runner.prefill_graphs) == {32, 64}
    short = _runner(_engine(CudaPartsOnCpu(), tiny, max_model_len=40, max_num_batched_tokens=64))
    assert short.prefill_sizes == [32]
    assert short.table_width == 10  # ceil(40 / 4) blocks per sequence


def test_staggered_arrivals_use_both_graphs_and_match_cpu(tiny: Path) -> None:
    """One prompt joins every 2 steps: it prefills through a prefill graph next to the decode
    graph of the running ones (batch 1, 2, then 3 padded to 4). The 70-token prompt exceeds the
    step budget (64): its first chunk runs eagerly, its last 6 tokens over the cached 64 replay
    the 32-token prefill graph."""
    prompts = _prompts(5, 20, 9, 70)
    engine = _engine(CudaPartsOnCpu(), tiny)
    runner = _runner(engine)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)  # long enough to overlap
    got = _run(engine, prompts, params, arrive_every=2)
    want = _run(_engine(CpuPlatform(), tiny), prompts, params, arrive_every=2)
    assert got == want
    assert runner.num_prefill_graph_steps == 4  # 5, 20 and 9 tokens, the 70's last chunk
    assert runner.num_graph_steps > 0 and runner.num_eager_steps >= 1  # the 70's first chunk
    replays = {bs: g.num_replays for bs, g in runner.graphs.items()
               if isinstance(g, ReplayedForward)}
    assert replays[4] > 0, "three decodes must replay the batch-4 graph (one padding row)"
    assert runner.prefill_graphs[32].num_replays == 4  # type: ignore[attr-defined]


def test_batched_prefill_runs_eagerly_and_a_last_chunk_replays_the_prefill_graph(
        tiny: Path) -> None:
    """Three prompts in a 32-token budget: 7 + 11 + the first 14 of 50 together (eager), then
    32 more of the 50 (a chunk that samples nothing: eager), then its last 4 tokens over the
    46 in the cache, alone: the 32-token prefill graph with a cached prefix."""
    prompts = _prompts(7, 11, 50)
    engine = _engine(CudaPartsOnCpu(), tiny, max_num_batched_tokens=32)
    runner = _runner(engine)
    got = _run(engine, prompts, GREEDY)
    assert got == _run(_engine(CpuPlatform(), tiny, max_num_batched_tokens=32), prompts, GREEDY)
    assert runner.num_prefill_graph_steps == 1
    assert runner.num_eager_steps == 2 and runner.num_graph_steps > 0


def test_prefix_cache_hits_replay_the_prefill_graph_over_the_cached_prefix(tiny: Path) -> None:
    """Prompts that share a cached prefix prefill only their new tokens, in the prefill graph
    (the cached length read from the staging buffer at replay), next to running decodes or
    alone; one whose padded bucket would run past the block table (80 cached of a 90-token
    prompt in a 96-token model: 80 + 32 > 96) runs eagerly. Tokens equal core's CPU backend."""
    base = _prompts(41)[0]
    long = _prompts(90)[0]
    prompts = [base, base + [7, 8, 9], base[:37] + [5] * 10, long, long[:80] + [3] * 10]
    kw: dict[str, Any] = dict(enable_prefix_caching=True, max_num_batched_tokens=96)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = _engine(CudaPartsOnCpu(), tiny, **kw)
    runner = _runner(engine)
    got = _run(engine, prompts, params, arrive_every=3)
    assert got == _run(_engine(CpuPlatform(), tiny, **kw), prompts, params, arrive_every=3)
    hits = engine.block_manager.num_cache_hits
    assert hits >= 3, hits
    # base (41 tokens, whole), its two extensions (after 40 and 36 cached tokens); the two
    # 90-token prompts exceed the largest bucket (64) whole, and the second one's 10 new
    # tokens after 80 cached have no bucket that fits the table.
    assert runner.num_prefill_graph_steps == 3, runner.num_prefill_graph_steps
    assert runner.prefill_graphs[32].num_replays == 2  # type: ignore[attr-defined]
    assert runner.prefill_graphs[64].num_replays == 1  # type: ignore[attr-defined]
    assert runner.num_eager_steps == 2


def test_enforce_eager_captures_nothing(tiny: Path) -> None:
    engine = _engine(CudaPartsOnCpu(), tiny, enforce_eager=True)
    runner = _runner(engine)
    prompts = _prompts(6, 13)
    got = _run(engine, prompts, GREEDY)
    assert not runner.graphs and not runner.prefill_graphs
    assert runner.num_graph_steps == runner.num_prefill_graph_steps == 0
    assert runner.num_eager_steps > 0
    assert got == _run(_engine(CpuPlatform(), tiny), prompts, GREEDY)


def test_padding_rows_write_no_kv(tiny: Path) -> None:
    """A 6-token prompt in the 32-token prefill graph and three decodes in the batch-4 graph:
    blocks no sequence owns stay zero (padding rows have slot -1)."""
    engine = _engine(CudaPartsOnCpu(), tiny)
    runner = _runner(engine)
    for p in _prompts(6, 3, 10):
        engine.add_request(p, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        engine.step()
    for _ in range(2):
        engine.step()
    assert runner.num_prefill_graph_steps == 3 and runner.graphs[4].num_replays > 0  # type: ignore[attr-defined]
    owned = {b for seq in engine.scheduler.running for b in seq.block_table}
    assert owned
    for k, v in engine.kv.kv_caches():
        free = [b for b in range(k.shape[0]) if b not in owned]
        assert k[free].eq(0).all() and v[free].eq(0).all()
        assert k[sorted(owned)].ne(0).any()
    # The staging rows past the three real decodes are padding: one token of context, no slot.
    _, _, slots, seq_lens, _ = runner._views(runner._np, 4)
    assert slots[3] == -1 and seq_lens[3] == 1
    engine.shutdown()


def test_non_greedy_requests_sample_the_graph_hidden_states(tiny: Path) -> None:
    """Requests that are not plain greedy (min_tokens, temperature) take the graph's final hidden
    states through core's sampler, alone in a prefill graph and together in a decode graph."""
    prompts = _prompts(4, 9)
    params = [SamplingParams(max_tokens=4, temperature=0.0, min_tokens=3, ignore_eos=True),
              SamplingParams(max_tokens=4, temperature=0.9, top_k=20, seed=11, ignore_eos=True)]
    engine = _engine(CudaPartsOnCpu(), tiny)
    got = _run(engine, prompts, params, arrive_every=2)
    assert _runner(engine).num_graph_steps > 0 and _runner(engine).num_prefill_graph_steps == 2
    assert got == _run(_engine(CpuPlatform(), tiny), prompts, params, arrive_every=2)


def _run_mixed(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
               ) -> list[tuple[list[int], list[Any] | None]]:
    ids = [engine.add_request(p, sp, constraint=(lambda: OnlyToken(7)) if k == 3 else None)
           for k, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    done: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [(list(done[i].token_ids), done[i].logprobs) for i in ids]


def test_mixed_batch_samples_only_the_rows_that_need_it_from_the_graph_logits(tiny: Path) -> None:
    """Plain greedy rows keep the graph's argmax; penalised, logprob, constrained and sampled rows
    in the same decode graph sample the graph's own logits, and everything (logprobs included)
    matches core's eager CPU steps."""
    prompts = _prompts(5, 6, 7, 8)
    params = [GREEDY,
              SamplingParams(max_tokens=5, temperature=0.0, presence_penalty=0.8,
                             frequency_penalty=0.4, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)]  # constrained
    engine = _engine(CudaPartsOnCpu(), tiny)
    got = _run_mixed(engine, prompts, params)
    assert _runner(engine).num_graph_steps > 0
    want = _run_mixed(_engine(CpuPlatform(), tiny), prompts, params)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert got[3][0] == [7] * 5
    lp_got, lp_want = got[2][1], want[2][1]
    assert lp_got is not None and lp_want is not None and len(lp_got) == 5
    for a, b in zip(lp_got, lp_want, strict=True):
        assert (a.token_id, a.rank, [t for t, _ in a.top]) == (b.token_id, b.rank, [t for t, _ in b.top])
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    all_rows = [params[2]] * 4  # every row needs the logits: the whole-batch path
    assert [g[0] for g in _run_mixed(_engine(CudaPartsOnCpu(), tiny), prompts, all_rows)] == \
        [w[0] for w in _run_mixed(_engine(CpuPlatform(), tiny), prompts, all_rows)]


def test_constraints_that_change_every_step_mask_with_fresh_state_in_every_graph(tiny: Path) -> None:
    """Constrained rows whose allowed token changes every step, arriving one at a time beside a
    plain greedy row: each prefill graph, whole-batch decode graph and subset decode graph
    samples with a mask begun before its replay from the state after the previous token (a
    stale or missing mask gives a refused token and the request fails)."""
    from sagellm.testing.structured import run_scripted_beside_greedy

    scripts = [[5, 9, 200, 31, 63], [17, 17, 2, 255], [128, 1, 96]]
    engine = _engine(CudaPartsOnCpu(), tiny)
    runner = _runner(engine)
    begun: list[bool] = []
    sample_tokens = runner.sample_tokens

    def recording(logits: torch.Tensor, seqs: list[Any], **kw: Any) -> Any:
        begun.append(kw.get("mask_fill") is not None)
        return sample_tokens(logits, seqs, **kw)

    runner.sample_tokens = recording  # type: ignore[method-assign]
    folded: list[int] = []
    masked_argmax = runner.masked_argmax

    def folding(logits: torch.Tensor, bitmask: torch.Tensor, rows: Any) -> torch.Tensor:
        folded.append(bitmask.shape[0])
        return masked_argmax(logits, bitmask, rows)

    runner.masked_argmax = folding  # type: ignore[method-assign]
    for out, script in zip(run_scripted_beside_greedy(engine, scripts, 12), scripts, strict=True):
        assert out.error is None and list(out.token_ids) == script
    assert runner.num_prefill_graph_steps == 2 and runner.num_graph_steps > 5
    assert begun[0] is False and all(begun[1:])  # the first learns the logits' width
    # The greedy constrained rows of later graph steps fold their mask into the argmax.
    assert len(folded) > 5 and max(folded) == 3


class _EveryKth:
    """Allows the tokens that are multiples of ``k`` (a mask with a real choice in it, so the
    argmax over the allowed tokens depends on the model's logits)."""

    fills_whole_bitmask_row = False

    def __init__(self, k: int) -> None:
        self.k = k

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        words = [0] * bitmask.shape[1]
        for t in range(0, 32 * len(words), self.k):
            words[t // 32] |= 1 << (t % 32)
        # As signed int32 words (bit 31 is the sign bit).
        bitmask[row] = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words],
                                    dtype=torch.int32)

    def accept_token(self, token_id: int) -> bool:
        return token_id % self.k == 0

    def is_terminated(self) -> bool:
        return False


@pytest.mark.parametrize(("constrained", "ahead"), [((1, 3), False), ((0, 1, 2, 3), False),
                                                   ((1, 3), True)])
def test_greedy_constrained_rows_fold_the_mask_into_the_argmax(
        tiny: Path, constrained: tuple[int, ...], ahead: bool) -> None:
    """Greedy rows whose only reason to leave the graph's argmax is a grammar take the argmax
    over their allowed tokens from the graph's logits (part of the batch through a row index,
    or the whole batch), equal to core's eager mask-then-argmax on the CPU, with steps queued
    ahead (``ahead``) or not; a constrained row that also asks for logprobs still samples
    through ``sample_tokens``."""
    prompts = _prompts(5, 6, 7, 8)
    lp = SamplingParams(max_tokens=5, temperature=0.0, logprobs=2, ignore_eos=True)

    def run(platform: object, params: list[SamplingParams]) -> tuple[list[list[int]], int]:
        engine = _engine(platform, tiny, async_scheduling=ahead)
        assert engine.async_scheduling is ahead
        ids = [engine.add_request(p, sp, constraint=(lambda k=3 + i: _EveryKth(k))
                                  if i in constrained else None)
               for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
        calls = [0]
        if isinstance(engine.runner, CudaGraphModelRunner):
            inner = engine.runner.masked_argmax

            def counted(*a: Any) -> torch.Tensor:
                calls[0] += 1
                return inner(*a)

            engine.runner.masked_argmax = counted  # type: ignore[method-assign]
        done: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    assert out.error is None
                    done[out.request_id] = list(out.token_ids)
        return [done[i] for i in ids], calls[0]

    params = [GREEDY] * 4
    got, folds = run(CudaPartsOnCpu(), params)
    want, _ = run(CpuPlatform(), params)
    assert got == want and folds >= 3
    for i in constrained:
        assert all(t % (3 + i) == 0 for t in got[i])
    with_lp = [lp if i == constrained[0] else GREEDY for i in range(4)]
    got, folds = run(CudaPartsOnCpu(), with_lp)
    assert got == run(CpuPlatform(), with_lp)[0] and folds == 0


def _outputs(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
             ) -> list[Any]:
    """Each prompt's finished output (token ids, logprobs, prompt logprobs)."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def test_logprobs_come_from_the_cuda_kernel_and_equal_cores(tiny: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampled logprobs (graph decode steps, the whole batch and a part of it, with a penalty
    changing the logits in place) and prompt logprobs (an eager step) run through
    ``CudaPlatform.logprobs``, the Triton kernel, and give core's torch values."""
    import sagellm_cuda.logprobs_kernel as kernel

    calls: list[int] = []
    real = kernel.topk_logprobs

    def counted(logits: torch.Tensor, ids: torch.Tensor, k: int, **kw: Any) -> Any:
        calls.append(logits.shape[0])
        return real(logits, ids, k, **kw)

    monkeypatch.setattr(kernel, "topk_logprobs", counted)
    prompts = _prompts(5, 6, 7)
    params = [SamplingParams(max_tokens=4, temperature=0.0, logprobs=5, ignore_eos=True),
              SamplingParams(max_tokens=4, temperature=0.0, logprobs=20, presence_penalty=2.0,
                             repetition_penalty=1.5, ignore_eos=True),
              SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=3, ignore_eos=True)]

    engine = _engine(CudaPartsOnCpu(), tiny)
    got = _outputs(engine, prompts, params)
    assert _runner(engine).num_graph_steps > 0
    # The first step: 6 prompt-logprob rows (7 prompt tokens), then the 2 sampled logprob rows.
    assert calls == [6, 2, 2, 2, 2]
    calls.clear()
    want = _outputs(_engine(CpuPlatform(), tiny), prompts, params)
    assert not calls  # core keeps its torch op
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        pairs = list(zip(g.logprobs or [], w.logprobs or [], strict=True))
        pairs += [(a, b) for a, b in zip(g.prompt_logprobs or [], w.prompt_logprobs or [],
                                         strict=True) if a is not None or b is not None]
        for a, b in pairs:
            assert (a.token_id, a.rank, [t for t, _ in a.top]) == (b.token_id, b.rank,
                                                                   [t for t, _ in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-5)
    assert len(got[1].logprobs[0].top) == 20 and len(got[2].prompt_logprobs) == 7


@pytest.mark.parametrize("every_row", [True, False])
def test_greedy_logprob_rows_keep_the_graph_argmax(tiny: Path, every_row: bool) -> None:
    """Greedy rows asking only for logprobs (all of a decode batch, or some next to plain greedy
    rows) take the graph's argmax and their logprobs from its logits in place, without
    ``sample_tokens``; tokens and logprobs equal core's eager CPU steps."""
    prompts = _prompts(4, 5, 6)
    lp = SamplingParams(max_tokens=4, temperature=0.0, logprobs=4, ignore_eos=True)
    params = [lp, lp if every_row else GREEDY, lp]
    engine = _engine(CudaPartsOnCpu(), tiny)
    runner = _runner(engine)
    sampled: list[int] = []
    sample_tokens = runner.sample_tokens

    def counted(logits: torch.Tensor, seqs: list[Any], **kw: Any) -> Any:
        sampled.append(len(seqs))
        return sample_tokens(logits, seqs, **kw)

    runner.sample_tokens = counted  # type: ignore[method-assign]
    got = _outputs(engine, prompts, params)
    assert runner.num_graph_steps > 0 and len(sampled) == 1  # the first (eager prefill) step only
    want = _outputs(_engine(CpuPlatform(), tiny), prompts, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want, strict=True):
        assert (g.logprobs is None) == (w.logprobs is None)
        for a, b in zip(g.logprobs or [], w.logprobs or [], strict=True):
            assert (a.token_id, a.rank, [t for t, _ in a.top]) == (b.token_id, b.rank,
                                                                   [t for t, _ in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)



# -- the staging buffer's block-table rows, rewritten only where they changed ----------------

def _staging_runner(mb: int = 8, width: int = 16) -> CudaGraphModelRunner:
    """Just the staging buffers of a runner (no model): enough for ``_fill``."""
    runner = object.__new__(CudaGraphModelRunner)
    runner.block_size, runner.table_width, runner._mb = BLOCK, width, mb
    runner._np = np.full(4 * mb + mb * width, 99, dtype=np.int32)
    runner._table_rows = [None] * mb
    return runner


def _decoding(rid: str, num_tokens: int, first_block: int) -> SequenceState:
    seq = SequenceState(rid, list(range(3, 3 + num_tokens)), SamplingParams())
    seq.block_table = list(range(first_block, first_block + -(-num_tokens // BLOCK)))
    seq.num_computed_tokens = num_tokens - 1
    return seq


def _check_fill(runner: CudaGraphModelRunner, seqs: list[SequenceState], bs: int) -> None:
    """``_fill`` (with its row cache) writes what a fresh runner writes, in every used entry."""
    runner._fill(seqs, bs)
    fresh = _staging_runner(runner._mb, runner.table_width)
    fresh._fill(seqs, bs)
    got, want = runner._views(runner._np, bs), fresh._views(fresh._np, bs)
    for g, w in zip(got[:4], want[:4], strict=True):
        assert g.tolist() == w.tolist()
    for i, s in enumerate(seqs):
        assert got[4][i, :len(s.block_table)].tolist() == s.block_table


def test_fill_rewrites_only_changed_table_rows_and_stays_exact() -> None:
    runner = _staging_runner()
    a, b, c = _decoding("a", 7, 0), _decoding("b", 8, 20), _decoding("c", 5, 40)
    _check_fill(runner, [a, b, c], 4)
    for seq in (a, b, c):  # a decode step: b crosses into a new block
        seq.append_token(5)
        seq.num_computed_tokens += 1
        if seq.num_tokens > len(seq.block_table) * BLOCK:
            seq.block_table.append(60 + len(seq.block_table))
    _check_fill(runner, [a, b, c], 4)
    assert runner._table_rows[1] == (b.block_table, 0, 3)
    # Sliding-window release: head entries become NO_BLOCK in the same list.
    b.block_table[0:1] = [NO_BLOCK]
    b.num_released_blocks = 1
    _check_fill(runner, [a, b, c], 4)
    # Preemption and re-admission (or a fork, a prefix-cache hit): a new list, other blocks.
    a.block_table = [30, 31]
    _check_fill(runner, [a, b, c], 4)
    # b finished: c moves up a row, where b's longer table was.
    _check_fill(runner, [a, c], 2)
    # A same-length list changed in place at its end is caught by the last-entry check.
    c.block_table[-1] = 77
    _check_fill(runner, [a, c], 2)


def test_table_rows_follow_preemption_fork_and_prefix_hits_and_match_cpu(tiny: Path) -> None:
    """Engine-level check of the staging rows: a pool too small for all (preemptions, then
    re-admission into other blocks), shared prompt prefixes with prefix caching (hits), and
    ``n=2`` (a fork), with requests finishing at different lengths (rows shift up)."""
    base = _prompts(13)[0]
    prompts = [base + [5, 6], base + [7], _prompts(9)[0], base[:8] + [9, 9, 9]]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, n=n)
              for m, n in ((20, 1), (14, 2), (24, 1), (10, 1))]
    kw: dict[str, Any] = dict(num_kv_blocks=14, enable_prefix_caching=True)
    engine = _engine(CudaPartsOnCpu(), tiny, **kw)
    got = _run(engine, prompts, params)
    cpu = _engine(CpuPlatform(), tiny, **kw)
    assert got == _run(cpu, prompts, params)
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.num_cache_hits > 0
    assert _runner(engine).num_graph_steps > 0


def test_fill_pads_rows_past_the_batch() -> None:
    runner = _staging_runner()
    seq = _decoding("a", 6, 3)
    runner._fill([seq], 4)
    ids, pos, slots, seq_lens, _ = runner._views(runner._np, 4)
    assert ids.tolist() == [8, 0, 0, 0] and pos.tolist() == [5, 0, 0, 0]
    assert slots.tolist() == [4 * BLOCK + 1, -1, -1, -1] and seq_lens.tolist() == [6, 1, 1, 1]


# -- asynchronous scheduling: graph steps queued behind each other -----------------------------


def _counting_patches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the runner's placeholder patches, by the staging buffer they write."""
    import sagellm_cuda.graphs as graphs

    counts = {"decode": 0, "prefill": 0}
    real = graphs.patch_pending

    def counted(input_ids: torch.Tensor, rows: list[int], *args: Any) -> None:
        counts["prefill" if input_ids.shape[0] in graphs.PREFILL_BUCKETS else "decode"] += 1
        real(input_ids, rows, *args)

    monkeypatch.setattr(graphs, "patch_pending", counted)
    return counts


def test_async_staggered_graph_steps_take_pending_ids_on_the_device_and_match_sync(
        tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts join every 2 steps (prefill graph next to the decode graph, batch 1..4, one
    prompt whose first chunk runs eagerly): each decode graph's inputs are the previous step's ids, patched into the
    staging buffer before the replay; sampled, greedy and logprob rows mixed."""
    counts = _counting_patches(monkeypatch)
    prompts = _prompts(5, 20, 9, 70)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.9, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.0, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)]
    engine = _engine(CudaPartsOnCpu(), tiny, async_scheduling=True)
    assert engine.async_scheduling
    got = _run(engine, prompts, params, arrive_every=2)
    want = _run(_engine(CpuPlatform(), tiny), prompts, params, arrive_every=2)
    assert got == want
    runner = _runner(engine)
    assert runner.num_prefill_graph_steps == 4 and runner.num_graph_steps > 0
    assert counts["decode"] >= runner.num_graph_steps - 3
    assert engine.block_manager.ref_counts == {}


def test_async_preempted_sequences_recompute_their_pending_token_and_match_sync(
        tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool too small for all: a sequence preempted while its token is on its way is
    recomputed from its start, through the prefill graph when it is alone, its last input
    patched from the step before; prefix hits and an ``n=2`` fork on the way."""
    counts = _counting_patches(monkeypatch)
    base = _prompts(13)[0]
    prompts = [base + [5, 6], base + [7], _prompts(9)[0], base[:8] + [9, 9, 9]]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True, n=n)
              for m, n in ((20, 1), (14, 2), (24, 1), (10, 1))]
    kw: dict[str, Any] = dict(num_kv_blocks=14, enable_prefix_caching=True)
    engine = _engine(CudaPartsOnCpu(), tiny, async_scheduling=True, **kw)
    got = _run(engine, prompts, params)
    assert got == _run(_engine(CpuPlatform(), tiny, **kw), prompts, params)
    assert engine.scheduler.num_preemptions > 0 and engine.block_manager.num_cache_hits > 0
    assert counts["decode"] > 0


def test_prefill_graph_takes_a_pending_last_token_from_the_step_before(tiny: Path) -> None:
    """A whole prompt whose last token is still pending (a sequence preempted and re-admitted
    at once) replays the prefill graph with that input from the previous step's ids."""
    from sagellm.runner import PENDING_TOKEN, PrefillOp, StepLaunch, StepPlan

    engine = _engine(CudaPartsOnCpu(), tiny)
    runner = _runner(engine)
    prompt = _prompts(10)[0]

    def plan_for(tokens: list[int]) -> tuple[StepPlan, SequenceState]:
        seq = SequenceState("p", tokens, GREEDY)
        engine.block_manager.allocate(seq, len(tokens))
        return StepPlan(1, prefills=[PrefillOp(seq, 0, len(tokens))]), seq

    plan, seq = plan_for(prompt)
    want = runner.execute(plan)
    engine.block_manager.free(seq)
    plan, seq = plan_for(prompt[:-1] + [PENDING_TOKEN])
    other = SequenceState("q", [1], GREEDY)
    prev = StepLaunch([other, seq], torch.tensor([7, prompt[-1]]), lambda: [7, prompt[-1]])
    assert runner.launch(plan, prev).result() == want
    assert runner.num_prefill_graph_steps == 2


def test_host_staging_twins_alternate_and_wait_for_their_last_copy(tiny: Path) -> None:
    """Steps queued ahead: the host stages each step in the other page-locked twin, and writes
    a twin again only after the event behind its previous copy (a copy of step N that waits
    behind a long prefill replay must not read step N+1's inputs)."""
    engine = _engine(CudaPartsOnCpu(), tiny, async_scheduling=True)
    runner = _runner(engine)
    log: list[tuple[str, int]] = []

    class Event:
        def __init__(self, n: int) -> None:
            self.n = n

        def synchronize(self) -> None:
            log.append(("wait", self.n))

    count = iter(range(1000))
    runner.platform.record_event = lambda: Event(next(count))  # type: ignore[method-assign]
    used: list[int] = []
    real = runner._fill

    def fill(seqs: list[SequenceState], bs: int) -> list[int]:
        used.append(runner._hosts.slot)
        return real(seqs, bs)

    runner._fill = fill  # type: ignore[method-assign]
    prompts = _prompts(9, 30)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    got = _run(engine, prompts, params, arrive_every=2)
    assert got == _run(_engine(CpuPlatform(), tiny), prompts, params, arrive_every=2)
    assert len(used) >= 4 and all(a != b for a, b in zip(used, used[1:]))
    assert [n for kind, n in log if kind == "wait"], "a twin was reused without its event"
