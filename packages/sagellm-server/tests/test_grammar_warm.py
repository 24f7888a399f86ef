"""The server builds the grammar engine's view of its tokenizer while it starts, so the first
structured-output requests do not wait for it; a tokenizer it cannot use leaves the server up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FakeEngine, FakeTokenizer
from fastapi.testclient import TestClient

from sagellm.structured import tokenizer as grammar_tok
from sagellm.testing.tiny_model import make_tiny_llama
from sagellm_server.app import ServerConfig, create_app
from sagellm_server.async_engine import AsyncEngine
from sagellm_server.metrics import ServerMetrics


def _client(tokenizer: Any, **config: Any) -> TestClient:
    metrics = ServerMetrics("fake")
    engine = AsyncEngine(FakeEngine(), max_num_seqs=4, max_queued_requests=4, metrics=metrics)
    cfg = ServerConfig(served_model_name="fake", log_interval=0, max_model_len=64, **config)
    return TestClient(create_app(engine, cfg, tokenizer, metrics), raise_server_exceptions=False)


def test_the_view_is_built_before_the_first_request(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    built: list[int] = []
    real = grammar_tok._build
    monkeypatch.setattr(grammar_tok, "_build", lambda *a: built.append(1) or real(*a))
    tok = AutoTokenizer.from_pretrained(str(make_tiny_llama(tmp_path, tokenizer=True)))
    eos = (2,)
    key = (grammar_tok._digest(tok), 256, eos)
    assert grammar_tok._shared.get(key) is None
    with _client(tok, vocab_size=256, eos_token_ids=list(eos)) as c:
        assert built == [1] and grammar_tok._shared.get(key) is not None
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                            "structured_outputs": {"json_object": True}})
        assert r.status_code == 200, r.text
    assert built == [1]  # the request's check reused the start-up build


def test_a_tokenizer_without_a_grammar_view_still_serves(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sagellm.server"), \
            _client(FakeTokenizer(), vocab_size=1000) as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                            "structured_outputs": {"json_object": True}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
    assert any("structured output is not available" in m for m in caplog.messages)


def test_an_unexpected_failure_of_the_warm_up_leaves_the_server_up(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import sagellm_server.app as app_mod

    def broken(*a: Any, **k: Any) -> Any:
        raise RuntimeError("out of memory (test)")

    monkeypatch.setattr(app_mod, "compiler_for", broken)
    with caplog.at_level(logging.WARNING, logger="sagellm.server"), \
            _client(FakeTokenizer(), vocab_size=1000) as c:
        assert c.get("/health").status_code == 200
    assert any("will try again" in m for m in caplog.messages)
