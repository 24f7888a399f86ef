"""The server's tokenizer, loaded on a thread while the engine process starts.

The engine process takes seconds to load the model and capture graphs; the server process
needs the same model's tokenizer only once the engine is up (it reports the tokenizer's
folder in its start-up answer). Loading it after that answer put one to several seconds on the
path to the first request (6.6 s between "engine ready" and "serving" on an H200 machine,
about 1.5 s on a 2-core CPU box). When the model is a local folder, that folder is where the
engine reads its tokenizer too, so it is loaded here in the meantime and used if the engine
names the same folder; anything else (a GGUF file, a Hub id, the embedded default) is loaded
after the answer, as before.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Files whose presence makes a folder worth preloading from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: str | Path) -> Any:
    """``transformers.AutoTokenizer.from_pretrained(path)`` (tokenizer threads off: the server
    tokenizes from its own worker threads)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def local_tokenizer_dir(model: str | None) -> Path | None:
    """``model`` resolved, when it is a local folder holding tokenizer files; else ``None``."""
    if not model:
        return None
    path = Path(model).expanduser()
    if not path.is_dir() or not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    return path.resolve()


class TokenizerPreload:
    """Starts at once: imports transformers and, for a local model folder, loads its tokenizer
    with ``load``. :meth:`get` then hands out the tokenizer of the folder the engine named."""

    def __init__(self, model: str | None,
                 load: Callable[[str | Path], Any] = load_tokenizer) -> None:
        self.path = local_tokenizer_dir(model)
        self._load = load
        self._tokenizer: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sagellm-tokenizer-preload",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            importlib.import_module("transformers")  # seconds, needed in any case
            if self.path is not None:
                self._tokenizer = self._load(self.path)
        except BaseException as exc:  # noqa: BLE001 - get() loads again and raises its own error
            self._error = exc

    @property
    def preloaded(self) -> bool:
        """Whether the thread has finished with a tokenizer in hand."""
        return not self._thread.is_alive() and self._tokenizer is not None

    def get(self, path: str | Path) -> Any:
        """The tokenizer of ``path``: the preloaded one when ``path`` is the folder it came
        from, else (another folder, or the preload failed) loaded now."""
        self._thread.join()
        if self._tokenizer is not None and Path(path).expanduser().resolve() == self.path:
            return self._tokenizer
        return self._load(path)
