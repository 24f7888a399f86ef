"""Host memory of the prefix-cache index as the KV pool fills with cached blocks.

Why: in the H200 soak the engine process's RSS grew for the first ~10k requests and then stopped
(1.87 GB in three separate server runs). Every full block of every prompt stays cached (and
indexed) until the pool is full, so the index grows with traffic until it holds one entry per KV
block, then stays flat as evictions replace entries. This replays that on the CPU with the real
``BlockManager`` and a pool of the soak's size (268,017 blocks of 16 tokens on the H200), using
the soak's prompt and output lengths (64-1024 and 16-256 tokens, random ids).

    python packages/sagellm-core/benchmarks/prefix_index_rss.py [NUM_BLOCKS] [NUM_REQUESTS]
"""

from __future__ import annotations

import gc
import random
import sys

import torch

from sagellm.backends.torch_kv import TorchKVBackend
from sagellm.engine.block_manager import BlockManager
from sagellm.engine.sequence import SequenceState
from sagellm.protocols import KVCacheSpec
from sagellm.sampling_params import SamplingParams


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main(num_blocks: int = 268_017, num_requests: int = 16_000) -> None:
    # The KV backend's bookkeeping without device memory (no layers): the index is what is measured.
    pool = TorchKVBackend(KVCacheSpec(num_layers=0, num_kv_heads=1, head_dim=1, block_size=16,
                                      dtype=torch.float16), num_blocks, torch.device("cpu"))
    bm = BlockManager(pool, 16, enable_caching=True)
    rng = random.Random(0)
    base = _rss()
    for i in range(1, num_requests + 1):
        n = rng.randint(64, 1024) + rng.randint(16, 256)
        seq = SequenceState(f"r{i}", [rng.randint(100, 49000) for _ in range(n)],
                            SamplingParams(max_tokens=1))
        bm.acquire_cached_prefix(seq)
        bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
        seq.num_computed_tokens = seq.num_tokens
        bm.register_computed_blocks(seq)
        bm.free(seq)
        if i % 2000 == 0:
            gc.collect()
            print(f"{i:6d} requests  cached blocks {bm.num_cached_blocks:7d}  "
                  f"index RSS +{(_rss() - base) / 2**20:5.0f} MiB", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
