"""The versions of a model table: one dict per Delta commit, newest first."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from ._format import COMMIT_KEY
from ._open import open_snapshot
from .names import TableRef, locate

__all__ = ["history", "model_table_history"]


def model_table_history(
    table: str | os.PathLike[str], *, warehouse: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """The versions of a model table, newest first.

    Args:
        table: ``"ai_model.llama2_300"``, a path or a URI (see ``resolve_table_uri``).
        warehouse: root for names, as in ``resolve_table_uri``; default None.

    Returns:
        One dict per version: ``version`` (int), ``timestamp`` (UTC ``datetime``), ``operation``
        (str, the Delta operation: ``"CREATE TABLE"``, ``"WRITE"``), ``files`` and ``bytes``
        (int, of the model directory saved), ``chunk_size`` (int), ``source`` (str, the
        directory saved) and ``metadata`` (the dict given to ``save_model_table``). Commits not
        made by ``save_model_table`` (an OPTIMIZE, say) have None for files/bytes and empty
        metadata.

    Raises:
        ModelNotFoundError: no table there.
        ModelTableError: the location holds a Delta table that is not a model table, or
            delta-rs failed to read its log.
        ConfigError: a bad ``table`` or ``warehouse``.

    Example:
        >>> [h["version"] for h in model_table_history("ai_model.smollm2")]  # doctest: +SKIP
        [1, 0]
    """
    return history(locate(table, warehouse))


def history(ref: TableRef) -> list[dict[str, Any]]:
    """:func:`model_table_history` for a located table."""
    out = [_version_entry(entry) for entry in open_snapshot(ref).history()]
    out.sort(key=lambda h: h["version"], reverse=True)
    return out


def _version_entry(entry: dict[str, Any]) -> dict[str, Any]:
    info = entry.get(COMMIT_KEY)
    info = info if isinstance(info, dict) else {}
    ts = entry.get("timestamp")
    return {
        "version": int(entry["version"]),
        "timestamp": datetime.fromtimestamp(ts / 1000, tz=timezone.utc) if ts is not None else None,
        "operation": entry.get("operation"),
        "files": info.get("files"),
        "bytes": info.get("bytes"),
        "chunk_size": info.get("chunkSize"),
        "source": info.get("source"),
        "metadata": info.get("metadata", {}),
    }
