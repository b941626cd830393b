"""Opening a model table at a version, and turning delta-rs errors into this library's errors.

Every entry point (save, load, history, Spark read, :class:`~.table.ModelTable`) opens tables
here, so each failure reads the same wherever it happens: the table, where it resolved to, and the
fix. No ``deltalake`` exception leaves this package.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .. import settings
from ..errors import ConfigError, ModelNotFoundError, ModelTableError, bad_value
from ._format import COLUMNS, COMMIT_KEY
from .names import TableRef, locate


def missing_hint(ref: TableRef) -> str:
    return (
        f"save one with save_model_table(model_dir, {ref.table!r}), or check the name and the "
        f"warehouse (warehouse=... or ${settings.WAREHOUSE_ENV})"
    )


def delta_error(ref: TableRef, doing: str, exc: BaseException) -> Exception:
    """What to raise for ``exc``, raised by delta-rs while ``doing`` something to ``ref``."""
    from deltalake.exceptions import CommitFailedError, TableNotFoundError

    said = _message(exc)
    if isinstance(exc, TableNotFoundError):
        return ModelNotFoundError(f"{ref} does not exist ({doing}: {said}); {missing_hint(ref)}")
    if isinstance(exc, CommitFailedError):
        return ModelTableError(
            f"{ref}: {doing} conflicted with a concurrent writer ({said}); retry: another save "
            f"or Delta operation committed to the table at the same time"
        )
    return ModelTableError(
        f"{ref}: {doing} failed in delta-rs ({type(exc).__name__}: {said}); check that the "
        f"location is reachable and its _delta_log intact (a table written by "
        f"save_model_table), or save the model under another name"
    )


def _message(exc: BaseException) -> str:
    """The message of a delta-rs error without the Rust backtrace it may carry."""
    lines = []
    for line in str(exc).splitlines():
        if re.match(r"\s+\d+: ", line):  # "   0: <unknown>": the backtrace starts
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)


@contextlib.contextmanager
def delta_errors(ref: TableRef, doing: str) -> Iterator[None]:
    """Re-raise what delta-rs raises while ``doing`` as ModelNotFoundError / ModelTableError."""
    from deltalake.exceptions import DeltaError

    try:
        yield
    except (DeltaError, OSError) as exc:  # delta-rs raises OSError for storage failures
        raise delta_error(ref, doing, exc) from exc


def check_version(version: Any) -> int | None:
    """``version`` if it is None or an int >= 0; ConfigError otherwise."""
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigError(
            bad_value(
                "version", version, "pass a table version (an int >= 0) or None for the latest"
            )
        )
    return version


def _exists(uri: str) -> bool:
    from deltalake import DeltaTable

    try:
        return DeltaTable.is_deltatable(uri)
    except Exception:  # noqa: BLE001 - a bad URI is as good as a missing table here
        return False


def _missing_columns(dt) -> list[str]:
    names = {f.name for f in dt.schema().fields}
    return [c for c in COLUMNS if c not in names]


def open_latest(ref: TableRef, *, writing: bool = False):
    """The latest snapshot (a ``deltalake.DeltaTable``), or None when no Delta table is there.

    Raises ModelTableError when the Delta table there is not a model table.
    """
    from deltalake import DeltaTable

    if not _exists(ref.uri):
        return None
    with delta_errors(ref, "opening the table"):
        dt = DeltaTable(ref.uri)
        missing = _missing_columns(dt)
    if missing:
        fix = "refusing to overwrite it, choose another table name" if writing else (
            "pass a table written by save_model_table"
        )
        raise ModelTableError(
            f"{ref} is a Delta table but not a model table (no columns {missing}); {fix}"
        )
    return dt


@dataclass
class Snapshot:
    """One version of a model table, opened. Its methods are the only delta-rs reads."""

    ref: TableRef
    dt: Any  # deltalake.DeltaTable at ``version``
    is_latest: bool

    @property
    def version(self) -> int:
        return self.dt.version()

    @property
    def where(self) -> str:
        return f"{self.ref} version {self.version}"

    def table_id(self) -> str:
        """The Delta table id: it changes when a table is deleted and saved again in its place."""
        with delta_errors(self.ref, "reading the table metadata"):
            return self.dt.metadata().id

    def file_uris(self) -> list[str]:
        with delta_errors(self.ref, f"listing the data files of version {self.version}"):
            return self.dt.file_uris()

    def history(self) -> list[dict[str, Any]]:
        """The Delta commit infos of the table, newest first as delta-rs gives them."""
        from deltalake import DeltaTable

        with delta_errors(self.ref, "reading the table history"):
            # history() of a table opened at an old version numbers the latest commits from
            # that version downwards (deltalake 1.6), so ask the latest snapshot.
            return (self.dt if self.is_latest else DeltaTable(self.ref.uri)).history()

    def commit_info(self) -> dict[str, Any]:
        """Our ``byzerllm`` commit entry of this version ({} when that commit is not ours)."""
        for entry in self.history():
            if entry.get("version") == self.version:
                info = entry.get(COMMIT_KEY)
                return info if isinstance(info, dict) else {}
        return {}


def open_snapshot(ref: TableRef, version: int | None = None) -> Snapshot:
    """The table at ``version`` (latest when None).

    Raises:
        ModelNotFoundError: no table there, or no such version (or its log was cleaned up).
        ModelTableError: the Delta table there is not a model table, or delta-rs failed.
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError

    latest = open_latest(ref)
    if latest is None:
        raise ModelNotFoundError(f"{ref} does not exist: {missing_hint(ref)}")
    if version is None or version == latest.version():
        return Snapshot(ref, latest, is_latest=True)
    if version > latest.version():
        raise ModelNotFoundError(
            f"{ref} has no version {version}: its latest version is {latest.version()} "
            f"(see model_table_history({ref.table!r}))"
        )
    with delta_errors(ref, f"opening version {version}"):
        try:
            return Snapshot(ref, DeltaTable(ref.uri, version=version), is_latest=False)
        except DeltaError as exc:
            raise ModelNotFoundError(
                f"{ref} version {version} cannot be read (its log may have been cleaned up): "
                f"{exc}; see model_table_history({ref.table!r}) for the versions kept"
            ) from exc


def is_model_table(
    table: str | os.PathLike[str], warehouse: str | os.PathLike[str] | None = None
) -> bool:
    """Whether ``table`` names an existing model table.

    Args:
        table: a name (``"ai_model.llama2_300"``), a path or a URI (see ``resolve_table_uri``).
        warehouse: root for names, as in ``resolve_table_uri``; default None.

    Returns:
        True when a Delta table with the model table columns exists there; False otherwise
        (nothing there, a plain model directory, or a Delta table of something else).

    Raises:
        ConfigError: ``table`` is empty or not a string/path.

    Example:
        >>> is_model_table("/tmp/definitely/not/a/table")
        False
    """
    return exists(locate(table, warehouse))


def exists(ref: TableRef) -> bool:
    """:func:`is_model_table` for a located table."""
    try:
        return open_latest(ref) is not None
    except (ModelTableError, ModelNotFoundError):  # not a model table, or unreadable: "no"
        return False
