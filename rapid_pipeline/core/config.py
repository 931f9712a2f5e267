"""Typed, frozen configs with presets, and their command-line flags.

Every stage config is a frozen dataclass whose fields carry ``metadata={"help": ...}``;
`add_config_args` turns the fields into ``--flag`` options (so ``--help`` lists every knob with its
default) and `config_from_args` applies only the flags the user gave on top of a preset.

Presets: ``tiny`` (CPU tests, seconds), ``small`` (CPU minutes or one GPU), ``paper`` (the seed
paper's Table 6 and appendix C). Stages define ``PRESETS = {"tiny": Cfg(...), ...}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (``x: int = opt(3, "how many")``)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("configs are frozen: use tuples, not lists/dicts")
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar(args[0])
    return tp


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (override the preset)")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("help"):
            continue
        tp = _scalar(hints[f.name])
        help_text = f"{f.metadata['help']} (preset default: {f.default!r})"
        if tp is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) is tuple:
            inner = (typing.get_args(tp) or (str,))[0]
            group.add_argument(_flag(f.name), dest=f.name, type=inner if inner in (int, float, str) else str,
                               nargs="+", default=None, help=help_text)
        else:
            group.add_argument(_flag(f.name), dest=f.name, type=tp if tp in (int, float, str) else str,
                               default=None, help=help_text)


def config_from_args(base: T, args: argparse.Namespace) -> T:
    changes = {}
    for f in dataclasses.fields(base):
        value = getattr(args, f.name, None)
        if value is not None:
            changes[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(base, **changes)


def preset(presets: dict[str, T], name: str) -> T:
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]
