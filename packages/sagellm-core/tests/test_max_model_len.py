"""``max_model_len`` is bounded by the model's positions: a longer setting is refused at start-up
(naming the field and the model's limit) instead of failing mid-serving at the first position the
rotary tables do not cover; and the config refuses lengths and device indices below range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sagellm.config import EngineConfig
from sagellm.engine.llm_engine import LLMEngine


def _engine(path: Path, **kw: object) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), backend="cpu", dtype="float32", block_size=4,
                                  num_kv_blocks=64, **kw))


def _positions(path: Path) -> int:
    return int(json.loads((path / "config.json").read_text())["max_position_embeddings"])


def test_longer_than_the_model_is_refused_naming_both_limits(tiny_llama_dir: Path) -> None:
    limit = _positions(tiny_llama_dir)
    with pytest.raises(ValueError, match=rf"max_model_len={2 * limit}.*"
                                         rf"max_position_embeddings={limit}"):
        _engine(tiny_llama_dir, max_model_len=2 * limit)


def test_unset_is_the_model_limit_and_shorter_is_kept(tiny_llama_dir: Path) -> None:
    limit = _positions(tiny_llama_dir)
    assert _engine(tiny_llama_dir).max_model_len == limit
    assert _engine(tiny_llama_dir, max_model_len=limit).max_model_len == limit
    assert _engine(tiny_llama_dir, max_model_len=limit // 2).max_model_len == limit // 2


@pytest.mark.parametrize("field,value", [("max_model_len", 0), ("max_model_len", -5),
                                         ("device_index", -1)])
def test_out_of_range_settings_are_refused_by_the_config(field: str, value: int) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        EngineConfig(model="m", **{field: value})
