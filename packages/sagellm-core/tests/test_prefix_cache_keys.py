"""Prefix-cache keys: a crafted collision of the old keys, and per-request cache salts."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm import LLM, SamplingParams
from sagellm.kv_cache.block_hash import MAX_CACHE_SALT_CHARS, block_key, check_cache_salt, root_key

# Found by benchmarks/old_key_collision.c: 8 fixed tokens, then the bytes of two 64-bit states.
_FIXED = [17, 42, 101, 7, 250, 3, 64, 199]
_STATES = (1579780565472233822, 14627861684271705142)
A, B = ([*_FIXED, *((x >> (8 * i)) & 0xFF for i in range(8))] for x in _STATES)
TAIL = [33, 5, 77]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _old_key(parent: int | None, tokens: list[int]) -> int:
    """The block key before SHA-256 keys."""
    return hash((parent, tuple(tokens)))


def test_the_crafted_blocks_collide_under_the_old_keys_only() -> None:
    assert A != B and len(A) == len(B) == 16 and max(A + B) < 256
    assert _old_key(None, A) == _old_key(None, B)
    assert _old_key(_old_key(None, A), TAIL) == _old_key(_old_key(None, B), TAIL)  # and on
    assert block_key(root_key(None), A) != block_key(root_key(None), B)


@pytest.fixture(scope="module")
def plain(tiny_llama_dir: Path) -> LLM:
    return LLM(model=str(tiny_llama_dir), num_kv_blocks=64, enable_prefix_caching=False)


def test_the_crafted_collision_gets_its_own_kv(tiny_llama_dir: Path, plain: LLM) -> None:
    """With the old keys B reused A's cached block (16 hit tokens, other outputs)."""
    expected = [o.token_ids for o in plain.generate([A + TAIL, B + TAIL], GREEDY, use_tqdm=False)]
    assert expected[0] != expected[1]
    cached = LLM(model=str(tiny_llama_dir), num_kv_blocks=64)
    bm = cached.engine.block_manager
    assert cached.generate([A + TAIL], GREEDY, use_tqdm=False)[0].token_ids == expected[0]
    a_block = bm.index.match(root_key(None), A + TAIL, len(A)).blocks
    assert len(a_block) == 1
    out = cached.generate([B + TAIL], GREEDY, use_tqdm=False)[0]
    assert bm.num_cache_hits == 0 and out.token_ids == expected[1]
    b_block = bm.index.match(root_key(None), B + TAIL, len(B)).blocks
    assert len(b_block) == 1 and b_block != a_block  # each prompt has its own cached block


def test_same_salt_shares_the_prefix_other_salts_do_not(tiny_llama_dir: Path, plain: LLM) -> None:
    prompt = list(range(2, 60))  # three full blocks
    expected = plain.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    llm = LLM(model=str(tiny_llama_dir), num_kv_blocks=64)
    bm = llm.engine.block_manager

    def hits(salt: str | None) -> int:
        before = bm.num_cache_hits
        assert llm.generate([prompt], GREEDY, use_tqdm=False, cache_salt=salt)[0].token_ids == expected
        return bm.num_cache_hits - before

    assert hits("tenant-a") == 0
    assert hits("tenant-b") == 0 and hits(None) == 0
    assert hits("tenant-a") == 48 and hits("tenant-b") == 48 and hits(None) == 48
    assert llm.engine.get_stats().num_prefix_cache_hits == bm.num_cache_hits == 3 * 48


def test_a_salt_the_engine_cannot_take_is_rejected_and_the_engine_goes_on(plain: LLM) -> None:
    eng = plain.engine
    with pytest.raises(ValueError, match=f"at most {MAX_CACHE_SALT_CHARS}"):
        eng.add_request([5, 6, 7], GREEDY, cache_salt="x" * (MAX_CACHE_SALT_CHARS + 1))
    with pytest.raises(TypeError, match="cache_salt must be a string or None, not int"):
        eng.add_request([5, 6, 7], GREEDY, cache_salt=7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not bytes"):
        plain.generate([[5, 6, 7]], GREEDY, use_tqdm=False, cache_salt=b"t")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be empty"):
        eng.add_request([5, 6, 7], GREEDY, cache_salt="")
    assert not eng.has_unfinished_requests()
    out = plain.generate([[5, 6, 7]], GREEDY, use_tqdm=False, cache_salt="\ud800" + "s" * 255)[0]
    assert len(out.token_ids) == 12  # a lone surrogate is a salt like any other


def test_check_cache_salt_passes_what_it_accepts() -> None:
    assert check_cache_salt(None) is None
    assert check_cache_salt("t" * MAX_CACHE_SALT_CHARS) == "t" * MAX_CACHE_SALT_CHARS
    assert root_key("a") != root_key("b") != root_key(None)
