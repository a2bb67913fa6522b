"""Settings dataclasses as command-line flags and back: one flag per field, and the values given."""

from __future__ import annotations

import argparse
import dataclasses


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per config field; default None so only flags actually given override the config file."""
    for f in dataclasses.fields(cls):
        flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=field_help(f))
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=field_help(f),
                                metavar=f.name.upper())


def field_help(f: dataclasses.Field) -> str:
    """A setting's help with its allowed values and default (the parser's own default is None, so that only
    flags actually given override a config file)."""
    choices = f.metadata.get("choices")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = "off" if default is False else "on" if default is True else "''" if default == "" else default
    parts = [f.metadata.get("help") or ""]
    if choices:
        parts.append(f"one of: {', '.join(map(str, choices))}")
    parts.append(f"default: {shown}")
    return "; ".join(p for p in parts if p).replace("%", "%%")



def flag_values(args: argparse.Namespace, cls, file_values: dict) -> dict:
    """A settings section: the config file's values with the flags actually given (not None) over them."""
    values = dict(file_values)
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return values
