"""Models named by a Hugging Face Hub repo id (``Qwen/Qwen3-0.6B``), fetched through ``huggingface_hub``.

Files land in huggingface_hub's own cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``), so a model downloaded by ``huggingface-cli download`` or by
transformers is found without another copy, and ours is found by them. ``huggingface_hub`` reads
the token (``HF_TOKEN`` or a stored login) and the endpoint (``HF_ENDPOINT``) from the
environment itself. ``HF_HUB_OFFLINE=1`` resolves from the cache only; so does any run where the
Hub cannot be reached, when the revision is already cached.

Only what the engine reads is fetched: ``config.json``, the tokenizer files and the weights
(``*.safetensors``; ``*.bin`` only for a repo without safetensors; none for ``load_format
dummy``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: ``owner/name``: the Hub's character set, without a path separator or ``..`` component.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

#: Files every download takes: the config and everything a tokenizer may be made of.
_META_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "vocab*", "merges.txt",
                  "special_tokens_map.json", "added_tokens.json", "*.tiktoken", "chat_template*"]


class ModelNotCachedError(FileNotFoundError):
    """The repo (or revision) is not in the local cache and the Hub was not asked or not reached."""


def is_repo_id(model: str) -> bool:
    """True when ``model`` has the shape of a Hub repo id and names no local path."""
    return bool(_REPO_ID.match(model)) and not Path(model).expanduser().exists()


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it, but read now (it reads it at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> Path:
    """Where huggingface_hub keeps repos (for messages; the library resolves it itself)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def weight_patterns(filenames: list[str], load_format: str) -> list[str]:
    """The weight files to take from a repo listing: safetensors if any, else ``.bin``."""
    if load_format == "dummy":
        return []
    if any(f.endswith(".safetensors") for f in filenames):
        return ["*.safetensors", "*.safetensors.index.json"]
    if any(f.endswith(".bin") for f in filenames):
        return ["*.bin", "pytorch_model.bin.index.json"]
    return ["*.safetensors"]


def download_model(repo_id: str, revision: str | None = None, load_format: str = "auto") -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (a branch, tag or commit).

    Downloads what is missing unless offline; offline, or when the Hub is unreachable, returns
    the cached snapshot, or raises :class:`ModelNotCachedError` saying what to do.
    """
    import huggingface_hub
    from huggingface_hub import errors

    local_only = offline()
    patterns = list(_META_PATTERNS)
    if not local_only and load_format != "dummy":
        try:
            files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
                errors.GatedRepoError) as exc:
            raise FileNotFoundError(_hub_refused(repo_id, revision, exc)) from exc
        except Exception:  # noqa: BLE001 - unreachable Hub: fall back to the cache below
            local_only = True
            files = _cached_files(repo_id, revision)
        patterns += weight_patterns(files, load_format)
    else:
        patterns += weight_patterns(_cached_files(repo_id, revision), load_format)
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision,
                                                 allow_patterns=patterns,
                                                 local_files_only=local_only)
    except (errors.LocalEntryNotFoundError, FileNotFoundError) as exc:
        raise ModelNotCachedError(_not_cached(repo_id, revision, local_only)) from exc
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
            errors.GatedRepoError) as exc:
        raise FileNotFoundError(_hub_refused(repo_id, revision, exc)) from exc
    snapshot = Path(path)
    if not (snapshot / "config.json").exists():
        raise ModelNotCachedError(f"{repo_id} ({revision or 'main'}) in {snapshot} has no "
                                  f"config.json: is it a model repo served by transformers' layout?")
    return snapshot


def _cached_files(repo_id: str, revision: str | None) -> list[str]:
    """File names of the cached snapshot of ``repo_id``, or [] when none is cached."""
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                      allow_patterns=["config.json"]))
    except Exception:  # noqa: BLE001 - nothing cached: the caller's download says so
        return []
    return [p.name for p in root.iterdir()]


def _not_cached(repo_id: str, revision: str | None, offline_mode: bool) -> str:
    rev = f" at revision {revision}" if revision else ""
    why = ("HF_HUB_OFFLINE is set" if offline() else
           "the Hugging Face Hub could not be reached") if offline_mode else "the download failed"
    return (f"model {repo_id!r}{rev} is not in the Hugging Face cache ({cache_dir()}) and {why}. "
            f"Fetch it where there is network (`huggingface-cli download {repo_id}`"
            f"{' --revision ' + revision if revision else ''}) into that cache, set HF_HUB_CACHE "
            f"to a cache that has it, or pass a local model directory or .gguf file")


def _hub_refused(repo_id: str, revision: str | None, exc: Exception) -> str:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        return (f"model {repo_id!r} is gated: accept its licence on the Hub and set HF_TOKEN "
                f"(or run `huggingface-cli login`)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"model {repo_id!r} has no revision {revision!r}"
    return (f"model {repo_id!r} is not on the Hugging Face Hub (or is private: set HF_TOKEN); "
            f"a local path must exist")
