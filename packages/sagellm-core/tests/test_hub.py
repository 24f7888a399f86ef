"""Hub repo ids resolve through huggingface_hub's cache, laid out exactly as the library lays it
out (blobs, refs, snapshots of symlinks), with no network; ``.bin`` checkpoints load safely."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sagellm import LLM, SamplingParams
from sagellm.loader import hub
from sagellm.testing.tiny_model import make_tiny_llama

REPO = "sagellm-test/tiny-llama"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
PROMPT = [[5, 6, 7, 8, 9]]


def fill_cache(cache: Path, repo: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """Lay ``snapshots`` (commit -> source dir) out as huggingface_hub does: each file once under
    ``blobs/<hash>``, ``snapshots/<commit>/<name>`` a relative symlink to it, ``refs/<ref>`` the
    commit of each ref."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for commit, src in snapshots.items():
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            data = f.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            blob = root / "blobs" / digest
            if not blob.exists():
                blob.write_bytes(data)
            (snap / f.name).symlink_to(Path("..", "..", "blobs", digest))
    for ref, commit in refs.items():
        (root / "refs" / ref).write_text(commit)
    return root


@pytest.fixture()
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hub cache holding REPO at two commits; ``main`` points at the first."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    a = make_tiny_llama(tmp_path / "a", seed=1, tokenizer=True)
    b = make_tiny_llama(tmp_path / "b", seed=2, tokenizer=True)
    fill_cache(cache, REPO, {"a" * 40: a, "b" * 40: b}, {"main": "a" * 40})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import; the engine process reads them at start.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _generate(model: str, **kw: object) -> list[int]:
    return LLM(model=model, num_kv_blocks=16, **kw).generate(PROMPT, GREEDY, use_tqdm=False)[0].token_ids


def test_repo_id_shape() -> None:
    assert hub.is_repo_id("Qwen/Qwen3-0.6B")
    assert hub.is_repo_id("meta-llama/Llama-3.1-8B-Instruct")
    for not_id in ["model", "a/b/c", "../b", "a/..", "/abs/path", "a b/c", "", "a/"]:
        assert not hub.is_repo_id(not_id), not_id


def test_existing_directory_wins_over_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tiny_llama(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert not hub.is_repo_id("org/name")


def test_offline_cache_serves_main_and_pinned_revisions(hf_cache: Path, tmp_path: Path) -> None:
    main = _generate(REPO)
    assert main == _generate(str(tmp_path / "a"))
    pinned = _generate(REPO, revision="b" * 40)
    assert pinned == _generate(str(tmp_path / "b"))
    assert pinned != main  # different weights, so the revision really was honoured


def test_offline_and_not_cached_says_what_to_do(hf_cache: Path) -> None:
    with pytest.raises(hub.ModelNotCachedError) as err:
        LLM(model="sagellm-test/absent")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "huggingface-cli download sagellm-test/absent" in msg
    assert str(hf_cache) in msg
    with pytest.raises(hub.ModelNotCachedError, match="revision deadbeef"):
        LLM(model=REPO, revision="deadbeef")


def test_unreachable_hub_falls_back_to_the_cache(hf_cache: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")

    def unreachable(*a: object, **k: object) -> list[str]:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", unreachable)
    assert hub.download_model(REPO) == hf_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / ("a" * 40)
    with pytest.raises(hub.ModelNotCachedError, match="could not be reached"):
        hub.download_model("sagellm-test/absent")


def test_online_download_asks_for_the_right_files(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    snap = make_tiny_llama(tmp_path / "snap")
    seen: dict[str, object] = {}

    def listing(repo_id: str, revision: str | None = None) -> list[str]:
        return ["config.json", "pytorch_model.bin", "tokenizer.json", "README.md"]

    def download(repo_id: str, **kw: object) -> str:
        seen.update(kw, repo_id=repo_id)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert hub.download_model("o/n", revision="v1") == snap
    assert seen["revision"] == "v1" and seen["local_files_only"] is False
    patterns = seen["allow_patterns"]
    assert "*.bin" in patterns and "*.safetensors" not in patterns and "config.json" in patterns
    assert hub.weight_patterns(["x.safetensors", "y.bin"], "auto")[0] == "*.safetensors"
    assert hub.weight_patterns(["x.safetensors"], "dummy") == []


def test_hub_refusals_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    response = type("R", (), {"headers": {}, "status_code": 404, "request": None})()

    def missing(*a: object, **k: object) -> list[str]:
        raise errors.RepositoryNotFoundError("nope", response=response)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", missing)
    with pytest.raises(FileNotFoundError, match="not on the Hugging Face Hub"):
        hub.download_model("o/missing")


def test_bin_checkpoint_loads_like_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    st = make_tiny_llama(tmp_path / "st")
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(st / "config.json", binary / "config.json")
    torch.save(load_file(str(st / "model.safetensors")), binary / "pytorch_model.bin")
    assert _generate(str(binary)) == _generate(str(st))


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_bin_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    make_tiny_llama(bad)
    (bad / "model.safetensors").unlink()
    with open(bad / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        LLM(model=str(bad))


def test_no_weights_at_all_is_clear(tmp_path: Path) -> None:
    empty = make_tiny_llama(tmp_path / "e")
    (empty / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors or \*.bin"):
        LLM(model=str(empty))


def test_cli_generate_from_offline_cache(tmp_path: Path) -> None:
    """The user's path, as the issue states it: ``sagellm generate --model Qwen/Qwen3-0.6B`` with
    HF_HUB_OFFLINE=1 in a fresh process that reads the cache location from the environment. The
    cached snapshot is a tiny random Qwen3 (same architecture, with a byte-level tokenizer)."""
    from sagellm.testing.families import save_tiny_family

    snap = save_tiny_family(tmp_path / "qwen3", "qwen3")
    tok = make_tiny_llama(tmp_path / "tok", tokenizer=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, snap / f)
    cache = tmp_path / "hub"
    fill_cache(cache, "Qwen/Qwen3-0.6B", {"c" * 40: snap}, {"main": "c" * 40})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "sagellm.cli", "generate", "--model", "Qwen/Qwen3-0.6B",
           "--no-chat", "--max-tokens", "4", "--temperature", "0", "hi"]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    cmd[cmd.index("Qwen/Qwen3-0.6B")] = "Qwen/Qwen3-8B"
    missing = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    assert "huggingface-cli download Qwen/Qwen3-8B" in missing.stderr
    assert "HF_HUB_OFFLINE" in missing.stderr and "Traceback" not in missing.stderr
