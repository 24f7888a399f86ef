"""Tuned launch tables per device: the file mechanics that the MoE tables
(:mod:`sagellm_cuda.moe_tiles`) and the decode-product tables (:mod:`sagellm_cuda.gemv_tiles`)
share.

A table file is ``{"device": ..., "tables": {"<key>": {"<bucket>": cfg, ...}, ...}}``, named
after the device (:func:`device_slug`) in a directory shipped with the package; an environment
variable names another file, or a directory of ``<slug>.json``, to read instead. Buckets are
positive ints (rows or tokens, each kind with its own limit); a step of ``n`` uses the smallest
bucket at or above ``n``, the largest past the end (:func:`pick_bucket`). A malformed file is
refused with a ValueError naming the file, key and field, never skipped: a tuned table that
silently stops applying would look like a regression of the kernel.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

#: ``{key: {bucket: config}}``, buckets ascending.
Table = dict[str, dict[int, dict[str, int]]]
#: Checks one config: ``(cfg, where) -> cfg``, a ValueError naming ``where`` if it is wrong.
ConfigCheck = Callable[[object, str], dict[str, int]]


def device_slug(name: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia_h200"``: the table's file name for a device."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@cache
def device_name(device: torch.device) -> str:
    """The name a device's tables are filed under: the CUDA device's name, else its type."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device)


def pick_bucket(buckets: dict[int, dict[str, int]], n: int) -> dict[str, int]:
    """The config of the smallest bucket at or above ``n``, else of the largest."""
    for t, cfg in buckets.items():  # sorted ascending by TileTables.parse
        if t >= n:
            return cfg
    return cfg


class TileTables:
    """One kind of table: where its files are, how a config and a key are checked, what its
    buckets count. ``key_form`` (e.g. ``"kind=...,N=..."``): keys must start with its text
    before the first ``...``; None accepts any key. ``max_bucket`` None: no upper limit."""

    def __init__(self, *, env_var: str, config_dir: Path, check_config: ConfigCheck,
                 bucket: str, max_bucket: int | None = None,
                 key_form: str | None = None) -> None:
        self.env_var = env_var
        self.config_dir = config_dir
        self.check_config = check_config
        self.bucket = bucket
        self.max_bucket = max_bucket
        self.key_form = key_form
        self._loaded: dict[str, Table] = {}

    def parse(self, doc: object, where: str) -> Table:
        """A table file's content (``json.load``), checked, with buckets as ints."""
        if not isinstance(doc, dict) or not isinstance(doc.get("tables"), dict):
            raise ValueError(f"{where}: expected an object with a 'tables' object")
        tables: Table = {}
        for key, buckets in doc["tables"].items():
            if self.key_form is not None and not (
                    isinstance(key, str) and key.startswith(self.key_form.partition("...")[0])):
                raise ValueError(f"{where}: table key {key!r} is not {self.key_form!r}")
            if not isinstance(buckets, dict) or not buckets:
                raise ValueError(f"{where}: tables[{key!r}] must be a non-empty object of "
                                 f"{self.bucket} buckets")
            parsed = {}
            for name, cfg in buckets.items():
                parsed[self._bucket(name, f"{where}: tables[{key!r}]")] = self.check_config(
                    cfg, f"{where}: tables[{key!r}][{name!r}]")
            tables[key] = dict(sorted(parsed.items()))
        return tables

    def _bucket(self, name: str, where: str) -> int:
        try:
            n = int(name)
        except ValueError:
            raise ValueError(f"{where}: {self.bucket} bucket {name!r} is not an integer") from None
        if self.max_bucket is None and n < 1:
            raise ValueError(f"{where}: {self.bucket} bucket {n} must be >= 1")
        if self.max_bucket is not None and not 1 <= n <= self.max_bucket:
            raise ValueError(f"{where}: {self.bucket} bucket {n} must be in 1..{self.max_bucket}")
        return n

    def load(self, path: Path) -> Table:
        """The checked tables of one file."""
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return self.parse(doc, str(path))

    def device_tables(self, device_name: str) -> Table:
        """``$<env_var>`` (a file, or a directory holding ``<slug>.json``) if set, else the
        shipped ``<config_dir>/<slug>.json``; empty if none. Cached per device name until
        :meth:`clear_cache`."""
        if device_name not in self._loaded:
            override = os.environ.get(self.env_var)
            base = Path(override) if override else self.config_dir
            path = base if base.is_file() else base / f"{device_slug(device_name)}.json"
            if override and not path.exists():
                raise ValueError(f"{self.env_var}={override}: no such file (looked for {path})")
            self._loaded[device_name] = self.load(path) if path.exists() else {}
        return self._loaded[device_name]

    def clear_cache(self) -> None:
        """Forget loaded tables (tests, or after writing a new table)."""
        self._loaded.clear()
