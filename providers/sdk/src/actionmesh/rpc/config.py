"""Frozen-dataclass configs read from flags and environment in one place.

A service declares its config as a frozen dataclass with a docstring under each
field. :func:`load_config` turns it into a command line (``--field-name``),
falls back to the environment (``<PREFIX>_FIELD_NAME``), then to the default,
and uses the field docstrings as ``--help`` text, so the documentation of a
setting lives in exactly one place.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import os
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _base_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if args else str
    return annotation


def _parse(kind: Any, raw: str) -> Any:
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if typing.get_origin(kind) is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return kind(raw)


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The SQLAlchemy-style URL of a SQLite file (the default store of every service)."""
    return f"sqlite:///{Path(path).resolve()}"


def sqlite_path(url: str) -> str | None:
    """The file a ``sqlite:///`` URL names (``:memory:`` for an in-memory database);
    None for any other kind of URL."""
    if url in ("sqlite://", "sqlite:///:memory:"):
        return ":memory:"
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix) :].split("?", 1)[0]
    return path or ":memory:"


def env_name(prefix: str, field_name: str) -> str:
    return f"{prefix}_{field_name.upper()}"


def load_config(
    cls: type[T],
    *,
    env_prefix: str,
    argv: Sequence[str] | None = None,
    description: str | None = None,
    prog: str | None = None,
) -> T:
    """Build ``cls`` from flags, then ``<env_prefix>_*`` variables, then defaults."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if prog is None and main_spec is not None and main_spec.name.endswith(".__main__"):
        prog = f"python -m {main_spec.name.removesuffix('.__main__')}"
    parser = argparse.ArgumentParser(
        prog=prog, description=description or (cls.__doc__ or "").strip().splitlines()[0]
    )
    fields = dataclasses.fields(cls)
    for f in fields:
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default!r})"
        help_text = f"{docs.get(f.name, '')}{default} [env {env_name(env_prefix, f.name)}]"
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None, help=help_text
        )
    namespace = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields:
        raw = getattr(namespace, f.name)
        if raw is None:
            raw = os.environ.get(env_name(env_prefix, f.name))
        if raw is None:
            continue
        kind = _base_type(hints[f.name])
        try:
            values[f.name] = _parse(kind, raw)
        except ValueError as exc:
            parser.error(f"--{f.name.replace('_', '-')}: {exc}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
