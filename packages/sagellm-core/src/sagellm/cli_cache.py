"""``sagellm cache``: list, measure and clear the converted-model cache (``model_cache``)."""

from __future__ import annotations

import argparse
import json

from sagellm.loader import model_cache


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="cache_cmd")
    ls = sub.add_parser("list", help="every entry with its size (the default)")
    ls.add_argument("--json", action="store_true")
    sub.add_parser("size", help="total size in bytes and human units")
    clear = sub.add_parser("clear", help="remove entries: --all, or the keys given")
    what = clear.add_mutually_exclusive_group(required=True)
    what.add_argument("--all", action="store_true", help="every entry, legacy ones included")
    what.add_argument("--legacy", action="store_true",
                      help="only the path-keyed entries of older versions (never used again)")
    what.add_argument("keys", nargs="*", default=[], metavar="KEY",
                      help="an entry's key from `sagellm cache list`, or a unique prefix of it")


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _state(e: model_cache.CacheEntry) -> str:
    if e.partial:
        return "partial"
    return "legacy" if e.legacy else "ok"


def run_cache(args: argparse.Namespace) -> int:
    cmd = args.cache_cmd or "list"
    entries = model_cache.list_entries()
    if cmd == "list":
        if getattr(args, "json", False):
            print(json.dumps({"root": str(model_cache.cache_root()), "entries": [
                {"key": e.key, "path": str(e.path), "size_bytes": e.size_bytes, "state": _state(e),
                 "name": e.name} for e in entries]}, indent=2))
            return 0
        print(f"cache: {model_cache.cache_root()}")
        if not entries:
            print("(empty)")
        for e in entries:
            print(f"{e.key:<40} {human(e.size_bytes):>10}  {_state(e):<7}  {e.name or '?'}")
        if any(e.legacy for e in entries):
            print("legacy entries were keyed by file path and are never used again: "
                  "sagellm cache clear --legacy")
        return 0
    if cmd == "size":
        total = sum(e.size_bytes for e in entries)
        print(f"{total}\t{human(total)}\t{len(entries)} entries\t{model_cache.cache_root()}")
        return 0
    if args.legacy:
        removed = model_cache.clear([e.key for e in entries if e.legacy])
    else:
        removed = model_cache.clear(None if args.all else args.keys)
    freed = sum(e.size_bytes for e in removed)
    print(f"removed {len(removed)} entries, {human(freed)} freed")
    return 0
