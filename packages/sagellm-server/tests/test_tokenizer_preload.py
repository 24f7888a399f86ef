"""The tokenizer preload of the server's start-up (``sagellm_server.tokenizer_preload``)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from sagellm_server.tokenizer_preload import (
    TokenizerPreload,
    load_tokenizer,
    local_tokenizer_dir,
)


class Loads:
    """A stand-in loader that records what it loaded (and can be held back or fail)."""

    def __init__(self, fail: bool = False) -> None:
        self.paths: list[Path] = []
        self.fail = fail
        self.release = threading.Event()
        self.release.set()

    def __call__(self, path: str | Path) -> Any:
        self.release.wait(10)
        self.paths.append(Path(path))
        if self.fail:
            raise OSError(f"cannot read {path}")
        return ("tokenizer of", Path(path))


def _model_dir(tmp_path: Path, name: str = "model") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    return d


def test_a_local_folder_is_loaded_once_while_the_engine_starts(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    loads = Loads()
    pre = TokenizerPreload(str(d), load=loads)
    assert pre.path == d.resolve()
    # The engine names the same folder (spelled differently): the preloaded one, no new load.
    tok = pre.get(str(tmp_path / "." / "model"))
    assert tok == ("tokenizer of", d.resolve()) and loads.paths == [d.resolve()]
    assert pre.preloaded


def test_another_folder_or_no_local_model_loads_after_the_answer(tmp_path: Path) -> None:
    d, other = _model_dir(tmp_path), _model_dir(tmp_path, "converted")
    loads = Loads()
    pre = TokenizerPreload(str(d), load=loads)
    assert pre.get(other) == ("tokenizer of", other) and loads.paths == [d.resolve(), other]
    for model in (None, "", "Org/some-model", str(tmp_path / "m.gguf"), str(tmp_path / "none")):
        loads = Loads()
        pre = TokenizerPreload(model, load=loads)
        assert pre.path is None
        assert pre.get(other) == ("tokenizer of", other) and loads.paths == [other]


def test_a_folder_without_tokenizer_files_is_not_preloaded(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    assert local_tokenizer_dir(str(tmp_path / "weights")) is None
    (tmp_path / "weights" / "tokenizer_config.json").write_text("{}")
    assert local_tokenizer_dir(str(tmp_path / "weights")) == (tmp_path / "weights").resolve()


def test_a_failed_preload_loads_again_and_raises_its_own_error(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    loads = Loads(fail=True)
    pre = TokenizerPreload(str(d), load=loads)
    with pytest.raises(OSError, match="cannot read"):
        pre.get(d)
    assert loads.paths == [d.resolve(), d] and not pre.preloaded


def test_get_waits_for_a_preload_still_running(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    loads = Loads()
    loads.release.clear()
    pre = TokenizerPreload(str(d), load=loads)
    assert not pre.preloaded
    threading.Timer(0.2, loads.release.set).start()
    assert pre.get(d) == ("tokenizer of", d.resolve()) and len(loads.paths) == 1


def test_the_real_loader_reads_a_model_folder(tmp_path: Path) -> None:
    from sagellm.testing.tiny_model import make_tiny_llama

    d = make_tiny_llama(tmp_path, tokenizer=True)
    pre = TokenizerPreload(str(d))
    tok = pre.get(d)
    assert pre.preloaded and tok is pre.get(str(d))
    assert tok.decode(tok("hello").input_ids, skip_special_tokens=True).strip() == "hello"
    assert type(load_tokenizer(d)) is type(tok)
