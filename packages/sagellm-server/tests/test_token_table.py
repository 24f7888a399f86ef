"""Token texts and bytes for logprobs, against the embedded SmolLM2 tokenizer (byte-level BPE)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagellm_server.token_table import TokenTable


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from sagellm.loader.default_model import DEFAULT_MODEL_NAME  # noqa: F401

    dirs = sorted(Path.home().glob(".cache/sagellm/gguf/SmolLM2-135M-Instruct*"))
    if not dirs or not (dirs[0] / "tokenizer.json").exists():
        pytest.skip("the embedded model has not been unpacked on this machine yet")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(dirs[0]))


def test_bytes_rebuild_the_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    table = TokenTable(tokenizer, len(tokenizer))
    text = "Héllo, wörld — 你好"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    raw = b"".join(bytes(table.bytes(i)) for i in ids)
    assert raw.decode("utf-8") == text
    assert "".join(table.text(i) for i in tokenizer("plain words", add_special_tokens=False).input_ids) == "plain words"
    assert table.text(len(tokenizer) + 5) == "" and table.bytes(-1) == []
