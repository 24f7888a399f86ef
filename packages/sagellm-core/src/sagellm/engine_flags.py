"""Command-line flags generated from :class:`~sagellm.config.EngineConfig`'s fields.

Each field becomes ``--kebab-case-name``: its type gives the argparse type (``bool`` a
``--x/--no-x`` pair, a ``Literal`` the choices), its default the flag's default, its
``description`` the help. The ``sagellm`` and ``sagellm-server`` commands add them with
:class:`EngineFlags`, so a new field is a new flag in both without another line of CLI code.

Why a generated table (``sagellm._engine_fields``) and not ``EngineConfig.model_fields`` at parse
time: ``sagellm --help`` must not import pydantic (it answers in a fraction of a second, see
``sagellm.cli``), and the help lists these flags. The table is plain data derived from the model
by :func:`derive`; ``python -m sagellm.engine_flags`` rewrites it, and a test fails while it
differs from the model, so the fields are still written once, in ``sagellm.config``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["str", "int", "float", "bool"]
_TYPES: dict[str, type] = {"int": int, "float": float}
#: Short metavars for numbers ("--block-size N", not "--block-size BLOCK_SIZE").
_METAVARS = {"int": "N", "float": "X"}


@dataclass(frozen=True)
class FlagSpec:
    """One ``EngineConfig`` field as a flag."""

    name: str
    kind: Kind
    default: str | int | float | bool | None
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def flag_specs() -> tuple[FlagSpec, ...]:
    """The flags of every ``EngineConfig`` field, from the generated table (no pydantic import)."""
    from sagellm._engine_fields import FIELDS

    return tuple(FlagSpec(**{**d, "choices": d["choices"] and tuple(d["choices"])}) for d in FIELDS)


class EngineFlags:
    """The engine's flags as one command shows them.

    ``rename`` gives a field another flag where the command already uses its name for something
    else (the flag's ``dest`` follows it); ``defaults`` gives a field another default where the
    command must differ from ``EngineConfig`` (say why beside the table); ``exclude`` leaves out
    fields the command sets itself (neither a flag nor in :meth:`config_kwargs`).
    """

    def __init__(self, rename: Mapping[str, str] | None = None,
                 defaults: Mapping[str, Any] | None = None,
                 exclude: frozenset[str] | set[str] = frozenset()) -> None:
        specs = flag_specs()
        names = {s.name for s in specs}
        for table in (rename or {}, defaults or {}, exclude):
            unknown = set(table) - names
            assert not unknown, f"not EngineConfig fields: {sorted(unknown)}"
        self.specs = tuple(s for s in specs if s.name not in exclude)
        self.rename = dict(rename or {})
        self.defaults = dict(defaults or {})

    def _flag(self, spec: FlagSpec) -> str:
        return self.rename.get(spec.name, spec.flag)

    def _dest(self, spec: FlagSpec) -> str:
        return self._flag(spec).lstrip("-").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """Add one flag per field, in the model's order."""
        for spec in self.specs:
            default = self.defaults.get(spec.name, spec.default)
            kwargs: dict[str, Any] = {"dest": self._dest(spec), "default": default,
                                      "help": spec.help.replace("%", "%%")}
            if spec.kind == "bool":
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _TYPES.get(spec.kind, str)
                if spec.kind in _METAVARS:
                    kwargs["metavar"] = _METAVARS[spec.kind]
                if spec.choices is not None:
                    kwargs["choices"] = list(spec.choices)
            action = parser.add_argument(self._flag(spec), **kwargs)
            # Some Python versions' BooleanOptionalAction append the default themselves; None
            # says nothing (the help says what happens without the flag).
            if default is not None and action.help and "%(default)" not in action.help:
                action.help += " (default: %(default)s)"

    def config_kwargs(self, args: argparse.Namespace) -> dict[str, Any]:
        """``EngineConfig`` keyword arguments from parsed ``args``: every field, by its name."""
        return {spec.name: getattr(args, self._dest(spec)) for spec in self.specs}


# -- deriving the table from the model (imports pydantic) ---------------------------------------


def derive() -> tuple[FlagSpec, ...]:
    """The flags as ``EngineConfig.model_fields`` says; what the generated table must equal."""
    import types
    import typing

    from sagellm.config import EngineConfig

    specs = []
    for name, info in EngineConfig.model_fields.items():
        annotation = info.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            assert len(args) == 1, f"{name}: only Optional[X] unions become flags"
            annotation = args[0]
        choices = None
        if typing.get_origin(annotation) is Literal:
            choices = tuple(str(c) for c in typing.get_args(annotation))
            annotation = str
        kind = {str: "str", int: "int", float: "float", bool: "bool"}.get(annotation)  # type: ignore[call-overload]
        assert kind is not None, f"{name}: no flag for a field of type {annotation!r}"
        assert info.description, f"EngineConfig.{name} needs a description= (its flag's help)"
        specs.append(FlagSpec(name, kind, info.default, info.description, choices))  # type: ignore[arg-type]
    return tuple(specs)


def render(specs: tuple[FlagSpec, ...]) -> str:
    """The source of ``sagellm._engine_fields`` for ``specs``."""
    rows = "".join(f"    {asdict(s)!r},\n" for s in specs)
    return ('"""GENERATED from ``sagellm.config.EngineConfig`` by ``python -m sagellm.engine_flags``: '
            'do not edit.\n\nThe flags of ``sagellm.engine_flags`` read this, so that ``--help`` '
            'needs no pydantic;\na test fails while it differs from the model.\n"""\n\n'
            "from __future__ import annotations\n\n"
            "from typing import Any\n\n"
            f"FIELDS: tuple[dict[str, Any], ...] = (\n{rows})\n")


TABLE_PATH = Path(__file__).with_name("_engine_fields.py")


if __name__ == "__main__":  # pragma: no cover
    TABLE_PATH.write_text(render(derive()))
    print(f"wrote {TABLE_PATH}")
