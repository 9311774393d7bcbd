"""Command-line flags built from a config dataclass: the dataclass is the single source of truth.

Each field becomes `--field_name`; its help text is the field's attribute docstring (the string
literal on the line after the field). Booleans become `--flag / --no-flag`; `list[...]` fields take
several values; `Optional[...]` fields default to None.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input: the CLI prints its message on one line and exits 2."""


def field_docs(cls: type) -> dict[str, str]:
    """Return {field name: attribute docstring} of a dataclass, read from its source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, whether None is allowed) for `X | None` / `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass `cls` to `parser`."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = docs.get(f.name, "")
        choices = f.metadata.get("choices")
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif typing.get_origin(tp) in (list, tuple):
            elem = typing.get_args(tp)[0]
            parser.add_argument(f"--{f.name}", nargs="+", type=elem, default=default, help=help_text,
                                choices=choices)
        else:
            parser.add_argument(f"--{f.name}", type=tp, default=default, help=help_text, choices=choices)


def config_from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """Build a `cls` from parsed flags (fields not exposed as flags keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli") is not False}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config from `config_to_dict` output, ignoring keys the class no longer has."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


def config_diff(a: Any, b: Any, ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ between two configs of one class: {name: (a value, b value)}."""
    da, db = config_to_dict(a), config_to_dict(b)
    return {k: (da.get(k), db.get(k)) for k in da.keys() | db.keys()
            if k not in ignore and da.get(k) != db.get(k)}


def run_cli(main: Any, description: str, cls: type[T], argv: Sequence[str] | None = None,
            on_interrupt: str = "interrupted") -> Any:
    """Parse flags into `cls`, call `main(cfg)`, and turn a UserError into a one-line message + exit 2
    (and Ctrl-C into `on_interrupt` + exit 130)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(parser, cls)
    ns = parser.parse_args(argv)
    try:
        return main(config_from_args(cls, ns))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(on_interrupt, file=sys.stderr)
        raise SystemExit(130) from None


def flags_markdown(cls: type) -> str:
    """A Markdown table of the flags built from config class `cls`: flag, default, meaning (for the README)."""
    docs = field_docs(cls)
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        meaning = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `--{f.name}` | `{shown}` | {meaning} |")
    return "\n".join(rows)
