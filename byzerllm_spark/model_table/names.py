"""Names and locations of model tables: ``ai_model.smollm2``, paths and URIs.

A name ``db.name`` lives at ``<warehouse>/db/name``, lower-cased like Spark's warehouse; it may be
quoted as Spark and Byzer-LLM quote it: ``` `db`.`name` ```, ``` `db`.name ``` or ``` `db.name` ```
(Byzer-LLM's ``save overwrite t as delta.`ai_model.llama2_300```). Anything else is a location:
URIs pass through and local paths are made absolute.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .. import settings
from ..errors import ConfigError, bad_value

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PART = rf"(?:({_IDENT})|`([A-Za-z0-9_]+)`)"  # a bare or a back-quoted part
_NAME_RE = re.compile(rf"{_PART}\.{_PART}")  # db.name, `db`.`name`, `db`.name, db.`name`
_QUOTED_NAME_RE = re.compile(rf"`({_IDENT})\.({_IDENT})`")  # `db.name`, as Byzer-LLM writes it
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_NAME_FORMS = "'ai_model.llama2_300', '`ai_model`.`llama2_300`' or '`ai_model.llama2_300`'"


@dataclass(frozen=True)
class TableRef:
    """A model table as the caller wrote it (``table``) and where it lives (``uri``)."""

    table: str
    uri: str

    def __str__(self) -> str:
        where = "" if self.table == self.uri else f" (at {self.uri})"
        return f"model table {self.table!r}{where}"


def is_uri(text: str) -> bool:
    """Whether ``text`` starts with a scheme (``file://``, ``s3://``, ...)."""
    return bool(_URI_RE.match(text))


def parse_name(text: str) -> tuple[str, str] | None:
    """``(db, name)``, lower-cased, when ``text`` is a table name in any quoting; else None."""
    match = _NAME_RE.fullmatch(text) or _QUOTED_NAME_RE.fullmatch(text)
    if match is None:
        return None
    parts = [g for g in match.groups() if g is not None]
    return parts[0].lower(), parts[1].lower()


def _text(param: str, value: object, fix: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(bad_value(param, value, fix))
    return value.strip()


def _location(text: str) -> str:
    if is_uri(text):
        scheme, sep, rest = text.partition("://")
        return scheme + sep + (rest.rstrip("/") or rest)  # one spelling per table: one cache key
    return os.path.abspath(os.path.expanduser(text))


def _in_warehouse(db: str, name: str, warehouse: str | os.PathLike[str] | None) -> str:
    root = warehouse_root(warehouse)
    if is_uri(root):
        return f"{root.rstrip('/')}/{db}/{name}"
    return os.path.join(root, db, name)


def warehouse_root(warehouse: str | os.PathLike[str] | None = None) -> str:
    """The warehouse of table names: ``warehouse``, else ``$BYZERLLM_WAREHOUSE``, else
    ``~/.byzerllm_spark/warehouse`` (``settings.warehouse_dir()``). A URI passes through."""
    if warehouse is None:
        env = (os.environ.get(settings.WAREHOUSE_ENV) or "").strip()
        # settings makes folders absolute; a URI warehouse (s3://bucket/wh) is kept as written.
        return env if is_uri(env) else settings.warehouse_dir()
    text = _text("warehouse", warehouse, "pass a directory path or URI for model tables")
    return text if is_uri(text) else os.path.abspath(os.path.expanduser(text))


def locate(
    table: str | os.PathLike[str], warehouse: str | os.PathLike[str] | None = None
) -> TableRef:
    """A name, path or URI as a :class:`TableRef` (the rules of :func:`resolve_table_uri`)."""
    text = _text(
        "table", table, f"pass a model table name like {_NAME_FORMS}, a directory path or a URI"
    )
    parsed = parse_name(text)
    if parsed is not None:
        return TableRef(text, _in_warehouse(*parsed, warehouse))
    if "`" in text:
        raise ConfigError(
            bad_value(
                "table",
                text,
                f"a quoted table name is written {_NAME_FORMS}; for a path drop the backquotes",
            )
        )
    return TableRef(text, _location(text))


def locate_name(name: str, warehouse: str | os.PathLike[str] | None = None) -> TableRef:
    """A table name (never a path) as a :class:`TableRef`; ConfigError for anything else."""
    text = _text("name", name, f"pass a model table name like {_NAME_FORMS}")
    parsed = parse_name(text)
    if parsed is None:
        raise ConfigError(
            bad_value(
                "name",
                text,
                f"pass a model table name like {_NAME_FORMS}; for a directory use "
                f"ModelTable.for_path",
            )
        )
    return TableRef(text, _in_warehouse(*parsed, warehouse))


def locate_path(path: str | os.PathLike[str]) -> TableRef:
    """A path or URI (never read as a name: ``ai_model.x`` is the directory ``./ai_model.x``)."""
    text = _text("path", path, "pass the table's directory path or URI")
    return TableRef(text, _location(text))


def resolve_table_uri(
    table: str | os.PathLike[str], warehouse: str | os.PathLike[str] | None = None
) -> str:
    """Turn a model table name, path or URI into the location of its Delta table.

    ``db.name`` resolves to ``<warehouse>/db/name``, lower-cased like Spark's warehouse; Spark's
    and Byzer-LLM's quotings (``` `db`.`name` ```, ``` `db.name` ```) name the same table. Anything
    else is a location: URIs (``file://``, ``s3://``, ...) pass through without a trailing ``/``
    and plain paths are made absolute. A bare relative path that looks like ``db.name`` is read as
    a name; write ``./db.name`` for the directory.

    Args:
        table: ``"ai_model.llama2_300"`` (str), a path (str or ``os.PathLike``) or a URI.
        warehouse: root for names (a path or URI); default None: ``$BYZERLLM_WAREHOUSE``, else
            ``~/.byzerllm_spark/warehouse`` (below ``$BYZERLLM_HOME`` when that is set).

    Returns:
        The table location (str): an absolute local path, or a URI.

    Raises:
        ConfigError: ``table`` or ``warehouse`` is empty or not a string/path, or ``table`` has
            backquotes but is not a ``db.name`` name.

    Example:
        >>> resolve_table_uri("ai_model.Llama2_300", warehouse="/wh")
        '/wh/ai_model/llama2_300'
        >>> resolve_table_uri("`ai_model`.`llama2_300`", warehouse="/wh")
        '/wh/ai_model/llama2_300'
    """
    return locate(table, warehouse).uri


def local_path(uri: str) -> str | None:
    """The local filesystem path of a table URI, or None when it is remote."""
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(uri).path)
    if is_uri(uri):
        return None
    return uri


def filesystem(uri: str):
    """A pyarrow filesystem and the path inside it for a table URI or local path."""
    from pyarrow import fs

    local = local_path(uri)
    if local is not None:
        return fs.LocalFileSystem(), local
    return fs.FileSystem.from_uri(uri)
