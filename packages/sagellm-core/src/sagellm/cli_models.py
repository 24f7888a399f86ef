"""``sagellm models``: the architectures core runs, and which backends run what they need."""

from __future__ import annotations

import argparse
import json

#: Capability field and the words ``sagellm models`` uses for each attention feature.
FEATURES = {"sliding_window": ("supports_sliding_window", "sliding window"),
            "logits_soft_cap": ("supports_logits_soft_cap", "soft-cap")}


def models_table() -> dict[str, object]:
    """Architectures (HF ``architectures`` names) and discovered backends, as plain data."""
    from sagellm.models import MODEL_REGISTRY, model_types_of
    from sagellm.plugins import get_registry

    archs = [{"architecture": name, "model_types": model_types_of(name),
              "module": cls.__module__,
              "attention_features": sorted(getattr(cls, "attention_features", ()))}
             for name, cls in sorted(MODEL_REGISTRY.items())]
    backends = []
    for b in get_registry().backends.values():
        row: dict[str, object] = {"name": b.name, "available": b.availability.available}
        try:
            caps = b.platform.capabilities()
            row.update({f: bool(getattr(caps, field)) for f, (field, _) in FEATURES.items()})
        except Exception as exc:  # a broken plugin must not break the listing
            row["error"] = f"capabilities() raised {type(exc).__name__}: {exc}"
        backends.append(row)
    return {"architectures": archs, "backends": backends}


def describe(table: dict[str, object]) -> str:
    lines = ["Architectures (config.json `architectures`):"]
    for a in table["architectures"]:  # type: ignore[attr-defined]
        feats = ", ".join(words for f, (_, words) in FEATURES.items()
                          if f in a["attention_features"])
        line = f"  {a['architecture']:<22} model_type {', '.join(a['model_types']):<12}"
        lines.append((line + (f" may use: {feats}" if feats else "")).rstrip())
    lines.append("Backends (sliding window / soft-cap; a model needing what a backend lacks is "
                 "refused there):")
    for b in table["backends"]:  # type: ignore[attr-defined]
        status = "" if b["available"] else " (unavailable here)"
        if "error" in b:
            lines.append(f"  {b['name']:<10} {b['error']}{status}")
            continue
        marks = " / ".join("yes" if b[f] else "no" for f in FEATURES)
        lines.append(f"  {b['name']:<10} {marks}{status}")
    return "\n".join(lines)


def run_models(args: argparse.Namespace) -> int:
    table = models_table()
    print(json.dumps(table, indent=2) if args.json else describe(table))
    return 0
