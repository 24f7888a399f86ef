"""Per-step cost of the token counts that penalties need: rebuilt from token ids, or kept.

Why: presence/frequency/repetition penalties need, per penalised row, each token's count in the
output (and whether it occurs in prompt or output). ``sagellm.layers.logits_processors`` rebuilds
Two ways: rebuild them every step from the sequences' token ids with one ``scatter_add``
(``token_counts``), or carry the last step's ``[rows, vocab]`` tensors to the next step, gather
the rows and scatter only the appended tokens (``TokenCountCache``, what the runner uses). This
times both per step for a batch of 8 on the CPU, and the penalties themselves.

    python packages/sagellm-core/benchmarks/penalty_counts.py [VOCAB] [BATCH]
"""

from __future__ import annotations

import random
import sys
import time

import torch

from sagellm.engine.sequence import SequenceState
from sagellm.engine.token_count_cache import TokenCountCache
from sagellm.layers.logits_processors import apply_penalties, token_counts
from sagellm.sampling_params import SamplingParams


def _time(fn, repeat: int = 50) -> float:  # type: ignore[no-untyped-def]
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e3


def _case(vocab: int, batch: int, out_len: int, prompt_len: int) -> tuple[float, float, float]:
    """ms per step: rebuild, carried cache, penalties."""
    dev = torch.device("cpu")
    rnd = random.Random(0)
    outputs = [[rnd.randrange(vocab) for _ in range(out_len)] for _ in range(batch)]
    prompts = [[rnd.randrange(vocab) for _ in range(prompt_len)] for _ in range(batch)]
    everything = [p + o for p, o in zip(prompts, outputs, strict=True)]

    def rebuild() -> None:
        token_counts(outputs, vocab, dev)
        token_counts(everything, vocab, dev)

    seqs = [SequenceState(str(i), p, SamplingParams(presence_penalty=0.5))
            for i, p in enumerate(prompts)]
    for s, o in zip(seqs, outputs, strict=True):
        s.token_ids.extend(o)
    cache = TokenCountCache()
    cache.counts(seqs, vocab, dev)

    def carried() -> None:
        for s in seqs:  # the token sampled by the previous step
            s.token_ids.append(rnd.randrange(vocab))
        cache.counts(seqs, vocab, dev)

    logits = torch.randn(batch, vocab)
    rows = torch.arange(batch)
    pres, freq, rep = torch.full((batch,), 0.5), torch.full((batch,), 0.3), torch.full((batch,), 1.1)
    counts = token_counts(outputs, vocab, dev)
    seen = token_counts(everything, vocab, dev) > 0
    penalties = _time(lambda: apply_penalties(logits.clone(), rows, counts, seen, pres, freq, rep))
    return _time(rebuild), _time(carried), penalties


def main() -> None:
    vocab = int(sys.argv[1]) if len(sys.argv) > 1 else 49152
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    torch.set_num_threads(1)
    print(f"vocab {vocab}, batch {batch}; ms per step")
    print(f"{'output len':>10} {'prompt len':>10} {'rebuild':>9} {'carried':>9} {'penalties':>10}")
    for out_len, prompt_len in ((16, 128), (256, 1024), (2048, 2048)):
        rebuild, carried, penalties = _case(vocab, batch, out_len, prompt_len)
        print(f"{out_len:>10} {prompt_len:>10} {rebuild:>9.3f} {carried:>9.3f} {penalties:>10.3f}")


if __name__ == "__main__":
    main()
