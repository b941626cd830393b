"""Model tables: a model directory kept as a Delta Lake table of checksummed binary chunks.

Byzer-LLM treats models as tables (``load model.`...` as t``, ``save overwrite t as
delta.`ai_model.llama2_300```). Here a model directory becomes a Delta table with one row per
chunk of each file::

    path         string   file path relative to the model directory, "/"-separated
    chunk_index  long     0, 1, 2, ... within the file
    offset       long     byte offset of the chunk in the file
    length       long     bytes in the chunk
    sha256       string   hex sha256 of the chunk (Spark: ``sha2(data, 256) = sha256``)
    file_size    long     size of the whole file
    file_digest  string   on the file's last chunk only: hex sha256 of the concatenated
                          binary sha256 digests of its chunks, in order (a hash list, like S3
                          multipart ETags), so a file is checked complete without hashing it twice
    data         binary   the chunk's bytes

Each save is one Delta commit, so an overwrite makes a new version, older versions stay readable
(time travel), and a save killed halfway leaves only unreferenced files behind. The commit info
carries a ``byzerllm`` entry: file count, byte count, chunk size and the caller's metadata.

Why the table is written this way: ``deltalake.write_deltalake`` buffers what it writes (about
2.5x the data in RSS, measured with deltalake 1.6), so the Parquet files are streamed here with
``pyarrow.parquet.ParquetWriter``, one row group at a time, and committed with delta-rs's
transaction API (``create_table_with_add_actions`` / ``create_write_transaction``).

Why 4 MiB chunks (the default): a Parquet page and an Arrow ``binary`` array hold at most 2 GiB
(int32 sizes and offsets); Spark's vectorized reader puts a whole row group's batch in column
vectors indexed by int, a Spark row must stay well under 2 GB, and a row sent to the driver or
over Spark Connect must fit a 128 MiB message; and every reader holds a whole row group in
memory. Chunks of 4 MiB, two to a row group (8 MiB), keep all of these far below their limits
and keep save and load memory to a few row groups, while the cost per chunk (a hash call, a
write call, a row) is negligible at 256 rows per GB. Larger chunks (up to 256 MiB) are
accepted; each then gets its own row group.

Importing this module is cheap: deltalake and pyarrow are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from byzerllm_spark.errors import (
    ChecksumError,
    ConfigError,
    ModelNotFoundError,
    ModelTableError,
    bad_value,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "is_model_table",
    "load_model_table",
    "model_table_history",
    "read_model_table",
    "resolve_table_uri",
    "save_model_table",
]

DEFAULT_CHUNK_SIZE = 4 << 20
"""Bytes per chunk row (4 MiB); see the module docstring for why."""

MAX_CHUNK_SIZE = 256 << 20
"""Largest chunk accepted: far below the 2 GiB Parquet/Arrow limits, and one row per row group."""

MIN_CHUNK_SIZE = 1 << 10

_ROW_GROUP_BYTES = 8 << 20  # bytes of chunk data per Parquet row group (and per save batch)
_FILE_BYTES = 256 << 20  # roll to a new Parquet file after this many bytes
_COMMIT_KEY = "byzerllm"  # key of our entry in the Delta commit info
_FORMAT = "byzerllm-model-table/1"
_WAREHOUSE_ENV = "BYZERLLM_WAREHOUSE"
_CACHE_ENV = "BYZERLLM_MODEL_CACHE"
_DEFAULT_WAREHOUSE = os.path.join("~", ".byzerllm", "warehouse")
_DEFAULT_CACHE = os.path.join("~", ".byzerllm", "model_cache")

_COLUMNS = ("path", "chunk_index", "offset", "length", "sha256", "file_size", "file_digest", "data")
_SPARK_DDL = (
    "path STRING, chunk_index BIGINT, offset BIGINT, length BIGINT, sha256 STRING, "
    "file_size BIGINT, file_digest STRING, data BINARY"
)
_EMPTY_SHA256 = hashlib.sha256(b"").digest()
_NAME_RE = re.compile(r"`?([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)`?")
_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


def _threads() -> int:
    return max(2, min(4, os.cpu_count() or 2))


def _arrow_schema():
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("chunk_index", pa.int64(), nullable=False),
            pa.field("offset", pa.int64(), nullable=False),
            pa.field("length", pa.int64(), nullable=False),
            pa.field("sha256", pa.string(), nullable=False),
            pa.field("file_size", pa.int64(), nullable=False),
            pa.field("file_digest", pa.string(), nullable=True),
            pa.field("data", pa.binary(), nullable=False),
        ]
    )


# --------------------------------------------------------------------------------------------
# Names and URIs


def resolve_table_uri(table: str | os.PathLike[str], warehouse: str | None = None) -> str:
    """Turn a model table name, path or URI into the URI of its Delta table.

    ``db.name`` (optionally in backticks, as Byzer writes it) resolves to ``<warehouse>/db/name``,
    lower-cased like Spark's warehouse. Anything else is a location: URIs (``file://``,
    ``s3://``, ...) pass through unchanged and plain paths are made absolute. A bare relative
    path that looks like ``db.name`` is read as a name; write ``./db.name`` for the directory.

    Args:
        table: ``"ai_model.llama2_300"``, ``"/data/models/llama2"`` or ``"file:///data/x"``.
        warehouse: root for names; default ``$BYZERLLM_WAREHOUSE``, else ``~/.byzerllm/warehouse``.

    Returns:
        The table location: an absolute local path, or a URI.

    Raises:
        ConfigError: ``table`` is empty or not a string/path.

    Example:
        >>> resolve_table_uri("ai_model.Llama2_300", warehouse="/wh")
        '/wh/ai_model/llama2_300'
    """
    if isinstance(table, os.PathLike):
        table = os.fspath(table)
    if not isinstance(table, str) or not table.strip():
        raise ConfigError(
            bad_value(
                "table",
                table,
                "pass a model table name like 'ai_model.llama2_300', a directory path or a URI",
            )
        )
    text = table.strip()
    if _URI_RE.match(text):
        scheme, sep, rest = text.partition("://")
        return scheme + sep + (rest.rstrip("/") or rest)  # one spelling per table: one cache key
    match = _NAME_RE.fullmatch(text)
    if match:
        root = _warehouse_root(warehouse)
        db, name = match.group(1).lower(), match.group(2).lower()
        if _URI_RE.match(root):
            return f"{root.rstrip('/')}/{db}/{name}"
        return os.path.join(root, db, name)
    return os.path.abspath(os.path.expanduser(text))


def _warehouse_root(warehouse: str | os.PathLike[str] | None) -> str:
    if warehouse is None:
        warehouse = os.environ.get(_WAREHOUSE_ENV) or _DEFAULT_WAREHOUSE
    if isinstance(warehouse, os.PathLike):
        warehouse = os.fspath(warehouse)
    if not isinstance(warehouse, str) or not warehouse.strip():
        raise ConfigError(
            bad_value("warehouse", warehouse, "pass a directory path or URI for model tables")
        )
    if _URI_RE.match(warehouse):
        return warehouse
    return os.path.abspath(os.path.expanduser(warehouse))


def _local_path(uri: str) -> str | None:
    """The local filesystem path of a table URI, or None when it is remote."""
    if uri.startswith("file://"):
        from urllib.parse import unquote, urlparse

        return unquote(urlparse(uri).path)
    if _URI_RE.match(uri):
        return None
    return uri


def _filesystem(uri: str):
    """A pyarrow filesystem and the path inside it for a table URI or local path."""
    from pyarrow import fs

    local = _local_path(uri)
    if local is not None:
        return fs.LocalFileSystem(), local
    return fs.FileSystem.from_uri(uri)


# --------------------------------------------------------------------------------------------
# Opening tables


def _describe(table: Any, uri: str) -> str:
    return f"model table {str(table)!r}" + ("" if str(table) == uri else f" (at {uri})")


def _check_version(version: Any) -> int | None:
    if version is None:
        return None
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConfigError(
            bad_value(
                "version", version, "pass a table version (an int >= 0) or None for the latest"
            )
        )
    return version


def _open(table: Any, uri: str, version: int | None):
    """Open the Delta table at ``version`` (latest when None), with readable errors."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError, TableNotFoundError

    try:
        exists = DeltaTable.is_deltatable(uri)
    except Exception:  # noqa: BLE001 - a bad URI is as good as a missing table here
        exists = False
    if not exists:
        raise ModelNotFoundError(
            f"{_describe(table, uri)} does not exist: save one with "
            f"save_model_table(model_dir, {str(table)!r}), or check the name and the warehouse "
            f"(warehouse=... or ${_WAREHOUSE_ENV})"
        )
    try:
        latest = DeltaTable(uri)
    except TableNotFoundError as exc:
        raise ModelNotFoundError(f"{_describe(table, uri)} does not exist: {exc}") from exc
    missing = [c for c in _COLUMNS if c not in _field_names(latest)]
    if missing:
        raise ModelTableError(
            f"{_describe(table, uri)} is a Delta table but not a model table (no columns "
            f"{missing}); pass a table written by save_model_table"
        )
    if version is None or version == latest.version():
        return latest
    if version > latest.version():
        raise ModelNotFoundError(
            f"{_describe(table, uri)} has no version {version}: its latest version is "
            f"{latest.version()} (see model_table_history({str(table)!r}))"
        )
    try:
        return DeltaTable(uri, version=version)
    except (DeltaError, TableNotFoundError) as exc:
        raise ModelNotFoundError(
            f"{_describe(table, uri)} version {version} cannot be read (its log may have been "
            f"cleaned up): {exc}; see model_table_history({str(table)!r}) for the versions kept"
        ) from exc


def _field_names(dt) -> set[str]:
    return {f.name for f in dt.schema().fields}


def _commit_info(uri: str, version: int) -> dict[str, Any]:
    """Our ``byzerllm`` commit entry for ``version`` ({} when that commit is not ours)."""
    from deltalake import DeltaTable

    # history() of a table opened at an old version numbers the latest commits from that
    # version downwards (deltalake 1.6), so ask the latest snapshot.
    for entry in DeltaTable(uri).history():
        if entry.get("version") == version:
            info = entry.get(_COMMIT_KEY)
            return info if isinstance(info, dict) else {}
    return {}


def is_model_table(table: str | os.PathLike[str], warehouse: str | None = None) -> bool:
    """Whether ``table`` names an existing model table.

    Args:
        table: a name (``"ai_model.llama2_300"``), a path or a URI.
        warehouse: root for names, as in :func:`resolve_table_uri`.

    Returns:
        True when a Delta table with the model table columns exists there; False otherwise
        (nothing there, a plain model directory, or a Delta table of something else).

    Raises:
        ConfigError: ``table`` is empty or not a string/path.

    Example:
        >>> is_model_table("/tmp/definitely/not/a/table")
        False
    """
    uri = resolve_table_uri(table, warehouse)
    from deltalake import DeltaTable

    try:
        if not DeltaTable.is_deltatable(uri):
            return False
        return all(c in _field_names(DeltaTable(uri)) for c in _COLUMNS)
    except Exception:  # noqa: BLE001 - any failure to read it means "not a model table"
        return False


# --------------------------------------------------------------------------------------------
# Save


@dataclass
class _SourceFile:
    rel: str
    abspath: str
    size: int
    digests: list[bytes] = field(default_factory=list)


def _scan_model_dir(model_dir: str) -> list[_SourceFile]:
    """Regular files under ``model_dir`` (symlinks followed, as in Hugging Face snapshots)."""
    files: list[_SourceFile] = []
    for root, dirs, names in os.walk(model_dir, followlinks=True):
        real = os.path.realpath(root)
        # A symlinked directory that leads back to an ancestor would make the walk endless.
        dirs[:] = sorted(
            d for d in dirs
            if not (real + os.sep).startswith(os.path.realpath(os.path.join(root, d)) + os.sep)
        )
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, model_dir).replace(os.sep, "/")
            try:
                st = os.stat(full)
            except FileNotFoundError as exc:
                raise ModelTableError(
                    f"{full!r} in model_dir disappeared or is a broken symlink; fix the model "
                    f"directory and save again"
                ) from exc
            if not stat.S_ISREG(st.st_mode):
                raise ModelTableError(
                    f"{full!r} in model_dir is not a regular file (a socket, FIFO or device); "
                    f"remove it from the model directory and save again"
                )
            files.append(_SourceFile(rel, full, st.st_size))
    files.sort(key=lambda f: f.rel)
    return files


def _read_chunk(path: str, view: memoryview, offset: int, size: int, last: bool) -> bytes:
    """Read ``len(view)`` bytes of ``path`` at ``offset`` into ``view``; return their sha256.

    Each task opens the file itself, so no descriptors are held between batches (a model with
    thousands of small files cannot run out of them) and tasks run in parallel threads: preadv
    and sha256 release the GIL.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ModelTableError(f"cannot read {path!r} from model_dir: {exc}") from exc
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        if done < len(view) or (last and os.fstat(fd).st_size != size):
            raise ModelTableError(
                f"{path!r} changed size while it was being saved; save again once the model "
                f"directory is no longer being written"
            )
    finally:
        os.close(fd)
    return hashlib.sha256(view).digest()


def _chunk_plan(
    files: list[_SourceFile], chunk_size: int
) -> Iterator[tuple[_SourceFile, int, int, int]]:
    """(file, chunk_index, offset, length) for every chunk, empty files as one empty chunk."""
    for f in files:
        if f.size == 0:
            yield f, 0, 0, 0
            continue
        index = 0
        for offset in range(0, f.size, chunk_size):
            yield f, index, offset, min(chunk_size, f.size - offset)
            index += 1


def _batched(plan: Iterator[tuple], rows: int) -> Iterator[list[tuple]]:
    batch: list[tuple] = []
    for item in plan:
        batch.append(item)
        if len(batch) == rows:
            yield batch
            batch = []
    if batch:
        yield batch


class _ParquetSink:
    """Writes row groups into Parquet files under the table, rolling at ``_FILE_BYTES``."""

    def __init__(self, uri: str, schema) -> None:
        self.fs, self.root = _filesystem(uri)
        self.schema = schema
        self.token = uuid.uuid4().hex
        self.adds: list[Any] = []
        self.written: list[str] = []
        self._writer = None
        self._stream = None
        self._name = ""
        self._bytes = 0
        self._stats: dict[str, Any] = {}

    def write(self, batch, meta: dict[str, Any]) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            self._name = f"part-{len(self.adds):05d}-{self.token}-c000.parquet"
            path = f"{self.root.rstrip('/')}/{self._name}"
            self.written.append(path)
            self._stream = self.fs.open_output_stream(path)
            self._writer = pq.ParquetWriter(
                self._stream,
                self.schema,
                compression="NONE",  # model weights do not compress; trying costs CPU
                use_dictionary=["path"],
                write_statistics=["path", "chunk_index", "offset", "length", "file_size"],
                store_schema=False,
            )
            self._bytes = 0
            self._stats = {}
        self._writer.write_batch(batch, row_group_size=batch.num_rows)
        self._bytes += meta["bytes"]
        st = self._stats
        if not st:
            st.update(meta)
        else:
            st["rows"] += meta["rows"]
            st["no_digest"] += meta["no_digest"]
            for key in ("min_path", "min_chunk"):
                st[key] = min(st[key], meta[key])
            for key in ("max_path", "max_chunk"):
                st[key] = max(st[key], meta[key])
        if self._bytes >= _FILE_BYTES:
            self.close_file()

    def close_file(self) -> None:
        if self._writer is None:
            return
        from deltalake.transaction import AddAction

        self._writer.close()
        self._stream.close()
        self._writer = self._stream = None
        path = f"{self.root.rstrip('/')}/{self._name}"
        size = self.fs.get_file_info(path).size
        st = self._stats
        # Exact (untruncated) min/max, so Delta readers may skip files on path predicates.
        stats = {
            "numRecords": st["rows"],
            "minValues": {"path": st["min_path"], "chunk_index": st["min_chunk"]},
            "maxValues": {"path": st["max_path"], "chunk_index": st["max_chunk"]},
            "nullCount": {c: 0 for c in _COLUMNS if c not in ("file_digest", "data")}
            | {"file_digest": st["no_digest"]},
        }
        self.adds.append(
            AddAction(self._name, int(size), {}, int(time.time() * 1000), True, json.dumps(stats))
        )

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._writer is not None:
                self._writer.close()
            if self._stream is not None:
                self._stream.close()
        for path in self.written:
            with contextlib.suppress(Exception):
                self.fs.delete_file(path)


def save_model_table(
    model_dir: str | os.PathLike[str],
    table: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    mode: str = "overwrite",
    warehouse: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Save a model directory as a new version of a Delta model table.

    Files are streamed in chunks (memory stays bounded whatever the model size), each chunk
    hashed with sha256, and the version is committed atomically: a save that dies halfway leaves
    the previous version as it was.

    Args:
        model_dir: local directory with the model files (subdirectories and symlinked files,
            as in Hugging Face snapshots, are followed).
        table: ``"ai_model.llama2_300"``, a path or a URI (see :func:`resolve_table_uri`).
        metadata: JSON-serialisable facts kept with this version (model type, base model,
            training parameters...); returned by :func:`model_table_history`.
        mode: ``"overwrite"`` writes a new version (creating the table if needed);
            ``"error"`` refuses to write to an existing table.
        warehouse: root for names, as in :func:`resolve_table_uri`.
        chunk_size: bytes per chunk row, 1 KiB to 256 MiB; default 4 MiB.

    Returns:
        The version just written (0 for a new table).

    Raises:
        ConfigError: ``model_dir`` is missing, not a directory or empty; or a bad ``mode``,
            ``chunk_size`` or ``metadata``.
        ModelTableError: the table exists and ``mode="error"``, the location holds a Delta table
            that is not a model table, or a file changed while it was read.

    Example:
        >>> v = save_model_table("/models/smollm2", "ai_model.smollm2",
        ...                      metadata={"base": "SmolLM2-135M"})  # doctest: +SKIP
    """
    import pyarrow as pa
    from deltalake import DeltaTable, Schema
    from deltalake.transaction import CommitProperties, create_table_with_add_actions

    if mode not in ("overwrite", "error"):
        raise ConfigError(bad_value("mode", mode, "use 'overwrite' (new version) or 'error'"))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not (
        MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
    ):
        raise ConfigError(
            bad_value(
                "chunk_size",
                chunk_size,
                f"pass an int from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes "
                f"(default {DEFAULT_CHUNK_SIZE})",
            )
        )
    user_meta = dict(metadata or {})
    try:
        json.dumps(user_meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            bad_value("metadata", metadata, f"pass a JSON-serialisable dict ({exc})")
        ) from exc

    src = _source_dir(model_dir)
    files = _scan_model_dir(src)
    if not files:
        raise ConfigError(
            bad_value("model_dir", str(model_dir), "the directory has no files to save")
        )

    uri = resolve_table_uri(table, warehouse)
    exists = DeltaTable.is_deltatable(uri)
    if exists:
        current = DeltaTable(uri)
        missing = [c for c in _COLUMNS if c not in _field_names(current)]
        if missing:
            raise ModelTableError(
                f"{_describe(table, uri)} is a Delta table but not a model table (no columns "
                f"{missing}); refusing to overwrite it, choose another table name"
            )
        if mode == "error":
            raise ModelTableError(
                f"{_describe(table, uri)} already exists (version {current.version()}); pass "
                f"mode='overwrite' to write a new version"
            )

    schema = _arrow_schema()
    fs, root = _filesystem(uri)
    fs.create_dir(root, recursive=True)
    sink = _ParquetSink(uri, schema)
    save_id = uuid.uuid4().hex
    total = sum(f.size for f in files)
    rows_per_group = max(1, _ROW_GROUP_BYTES // chunk_size)
    try:
        with ThreadPoolExecutor(_threads(), thread_name_prefix="model-table-read") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="model-table-write") as writer:
            # Three buffers in turn: batch n+1 is read and hashed while batch n is collected and
            # batch n-1 is encoded by the writer. Memory stays at three row groups whatever
            # the model size, and reusing buffers saves the page faults of fresh allocations.
            buffers = [pa.allocate_buffer(rows_per_group * chunk_size) for _ in range(3)]
            pending: Future | None = None
            reading: _PendingBatch | None = None
            plans = _batched(_chunk_plan(files, chunk_size), rows_per_group)
            for n, plan in enumerate(itertools.chain(plans, [None])):
                ahead = _PendingBatch(plan, pool, buffers[n % 3]) if plan is not None else None
                if reading is not None:
                    batch, meta = reading.collect(pa, schema)
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(sink.write, batch, meta)
                reading = ahead
            if pending is not None:
                pending.result()
        sink.close_file()
    except BaseException:
        sink.abort()  # nothing refers to these files yet: remove them
        raise
    # From here on the data files are kept even if the commit fails: once the commit may have
    # reached the log, deleting them could break the version it made.
    info = {
        "format": _FORMAT,
        "saveId": save_id,
        "files": len(files),
        "bytes": total,
        "chunkSize": chunk_size,
        "source": src,
        "metadata": user_meta,
    }
    props = CommitProperties(custom_metadata={_COMMIT_KEY: info})
    if exists:
        DeltaTable(uri).create_write_transaction(
            sink.adds, mode="overwrite", schema=schema, commit_properties=props
        )
    else:
        create_table_with_add_actions(
            uri,
            Schema.from_arrow(schema),
            sink.adds,
            mode="error",
            name=os.path.basename(uri.rstrip("/")) or None,
            description="byzerllm-spark model table: one row per chunk of each model file",
            commit_properties=props,
        )
    return _version_of_save(uri, save_id)


def _source_dir(model_dir: Any) -> str:
    if isinstance(model_dir, os.PathLike):
        model_dir = os.fspath(model_dir)
    if not isinstance(model_dir, str) or not model_dir.strip():
        raise ConfigError(bad_value("model_dir", model_dir, "pass the model's local directory"))
    path = _local_path(model_dir) if model_dir.startswith("file://") else model_dir
    if path is None or _URI_RE.match(path):
        raise ConfigError(bad_value("model_dir", model_dir, "pass a local directory"))
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise ConfigError(
            bad_value(
                "model_dir",
                model_dir,
                "it is not a directory" if os.path.exists(path) else "the directory does not exist",
            )
        )
    return path


class _PendingBatch:
    """The chunks of one row group, being read into ``buffer`` and hashed by ``pool``."""

    def __init__(self, plan: list[tuple], pool: ThreadPoolExecutor, buffer) -> None:
        self.plan = plan
        self.starts = starts = [0]
        for _, _, _, length in plan:
            starts.append(starts[-1] + length)
        self.buffer = buffer.slice(0, starts[-1])
        view = memoryview(buffer)[: starts[-1]]
        self.futures = [
            pool.submit(
                _read_chunk, f.abspath, view[starts[i] : starts[i + 1]], offset, f.size,
                offset + length >= f.size,
            )
            if length
            else None
            for i, (f, _, offset, length) in enumerate(plan)
        ]

    def cancel(self) -> None:
        for fut in self.futures:
            if fut is not None:
                fut.cancel()

    def collect(self, pa, schema):
        """Wait for the chunks; return (RecordBatch pointing into the buffer, file stats)."""
        try:
            return self._collect(pa, schema)
        except BaseException:
            self.cancel()
            raise

    def _collect(self, pa, schema):
        plan, starts = self.plan, self.starts
        paths, indexes, offsets, lengths, shas, fsizes, fdigests = [], [], [], [], [], [], []
        no_digest = 0
        for (f, index, offset, length), fut in zip(plan, self.futures):
            digest = fut.result() if fut is not None else _EMPTY_SHA256
            f.digests.append(digest)
            if offset + length >= f.size:  # the file's last chunk: its digest is now known
                fdigests.append(hashlib.sha256(b"".join(f.digests)).hexdigest())
                f.digests = []
            else:
                fdigests.append(None)
                no_digest += 1
            paths.append(f.rel)
            indexes.append(index)
            offsets.append(offset)
            lengths.append(length)
            shas.append(digest.hex())
            fsizes.append(f.size)
        buf = self.buffer
        data = pa.Array.from_buffers(
            pa.binary(), len(plan), [None, pa.array(starts, pa.int32()).buffers()[1], buf]
        )
        batch = pa.record_batch(
            [
                pa.array(paths, pa.string()),
                pa.array(indexes, pa.int64()),
                pa.array(offsets, pa.int64()),
                pa.array(lengths, pa.int64()),
                pa.array(shas, pa.string()),
                pa.array(fsizes, pa.int64()),
                pa.array(fdigests, pa.string()),
                data,
            ],
            schema=schema,
        )
        meta = {
            "bytes": starts[-1],
            "rows": len(plan),
            "no_digest": no_digest,
            "min_path": min(paths),
            "max_path": max(paths),
            "min_chunk": min(indexes),
            "max_chunk": max(indexes),
        }
        return batch, meta


def _version_of_save(uri: str, save_id: str) -> int:
    """The version our commit got (another writer may have committed right after us)."""
    from deltalake import DeltaTable

    for entry in DeltaTable(uri).history():
        info = entry.get(_COMMIT_KEY)
        if isinstance(info, dict) and info.get("saveId") == save_id:
            return int(entry["version"])
    raise ModelTableError(  # pragma: no cover - the log lost a commit just made
        f"the commit of this save is missing from the log of {uri}"
    )


# --------------------------------------------------------------------------------------------
# Load


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> str:
    if cache_dir is None:
        cache_dir = os.environ.get(_CACHE_ENV) or _DEFAULT_CACHE
    if isinstance(cache_dir, os.PathLike):
        cache_dir = os.fspath(cache_dir)
    if not isinstance(cache_dir, str) or not cache_dir.strip() or _URI_RE.match(cache_dir):
        raise ConfigError(bad_value("cache_dir", cache_dir, "pass a local directory"))
    return os.path.abspath(os.path.expanduser(cache_dir))


def _cache_key(uri: str, table_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:64] or "table"
    digest = hashlib.sha256(f"{uri}\0{table_id}".encode()).hexdigest()[:16]
    return f"{name}-{digest}"


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive lock between processes on this node (released if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: rely on the atomic rename alone
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_model_table(
    table: str | os.PathLike[str],
    *,
    version: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    warehouse: str | None = None,
) -> str:
    """Materialise a model table version as a local directory, verified and cached.

    Chunks are streamed one row group at a time (bounded memory), every chunk's sha256 and
    every file's digest is checked, and the files are written to a temporary directory that is
    renamed into place only when all of it is verified. The result is cached per node by
    table location, table id and version: a second load of the same version returns at once.
    Concurrent loads of one version on a node wait for each other instead of copying twice.

    Args:
        table: ``"ai_model.llama2_300"``, a path or a URI (see :func:`resolve_table_uri`).
        version: the table version to load; None for the latest.
        cache_dir: where materialised versions live; default ``$BYZERLLM_MODEL_CACHE``, else
            ``~/.byzerllm/model_cache``.
        warehouse: root for names, as in :func:`resolve_table_uri`.

    Returns:
        The path of the local model directory (do not modify it: it is the cache).

    Raises:
        ModelNotFoundError: no table there, or no such version.
        ChecksumError: a chunk or a file does not match its recorded digest (nothing is left
            in the cache).
        ModelTableError: the table is not a model table, or the version is incomplete.
        ConfigError: a bad ``version`` or ``cache_dir``.

    Example:
        >>> path = load_model_table("ai_model.smollm2", version=0)  # doctest: +SKIP
    """
    version = _check_version(version)
    root = _cache_root(cache_dir)
    uri = resolve_table_uri(table, warehouse)
    dt = _open(table, uri, version)
    version = dt.version()
    # The table id changes when a table is deleted and saved again at the same place, so a
    # stale cache of the old table's "v0" is never returned for the new one.
    key_dir = os.path.join(root, _cache_key(uri, dt.metadata().id))
    final = os.path.join(key_dir, f"v{version}")
    if os.path.isdir(final):
        return final
    os.makedirs(key_dir, exist_ok=True)
    with _file_lock(os.path.join(key_dir, f".v{version}.lock")):
        if os.path.isdir(final):  # another process materialised it while we waited
            return final
        # Under the lock every temporary directory of this version belongs to a dead process.
        prefix = f".v{version}.tmp-"
        for name in os.listdir(key_dir):
            if name.startswith(prefix):
                shutil.rmtree(os.path.join(key_dir, name), ignore_errors=True)
        tmp = os.path.join(key_dir, f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            _materialise(dt, table, uri, version, tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@dataclass
class _TargetFile:
    fd: int
    size: int
    submitted: int = 0
    written: int = 0
    # chunk index -> (offset, length, binary sha256)
    chunks: dict[int, tuple[int, int, bytes]] = field(default_factory=dict)
    expected: str | None = None


def _safe_rel(path: Any, where: str) -> str:
    """Reject absolute paths and ``..`` so a table cannot write outside the target directory."""
    parts = path.split("/") if isinstance(path, str) else []
    if not parts or "\\" in path or any(p in ("", ".", "..") for p in parts):  # "" covers "/x"
        raise ModelTableError(
            f"{where}: unsafe file path {path!r} in the table; refusing to write it"
        )
    return path


_DONE = object()


def _iter_row_groups(paths: list[str], where: str) -> Iterator[tuple[str, Any]]:
    """(parquet file, Table) per row group; a background thread reads the next one meanwhile.

    At most three row groups are alive (being read, queued, being written): memory stays
    bounded by the row group size, not the model size.
    """
    import pyarrow.parquet as pq

    out: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        path = ""
        try:
            for path in paths:
                fs, inner = _filesystem(path)
                with fs.open_input_file(inner) as handle:
                    pf = pq.ParquetFile(handle)
                    for rg in range(pf.metadata.num_row_groups):
                        if not put((path, pf.read_row_group(rg, columns=list(_COLUMNS)))):
                            return
            put(_DONE)
        except (OSError, ValueError) as exc:  # pyarrow: missing file, ArrowInvalid, ...
            error = ModelTableError(
                f"{where} cannot be read: data file {path} failed with {exc}; the table may be "
                f"damaged: load another version (version=...) or save the model again"
            )
            error.__cause__ = exc
            put(error)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=produce, name="model-table-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _Materialiser:
    """Writes verified chunks of one table version into a directory."""

    def __init__(self, where: str, target: str, pool: ThreadPoolExecutor) -> None:
        self.where = where
        self.target = target
        self.pool = pool
        self.files: dict[str, _TargetFile] = {}
        self.lock = threading.Lock()

    def close(self) -> None:
        for tf in self.files.values():
            if tf.fd >= 0:
                os.close(tf.fd)
                tf.fd = -1

    def _corrupt(self, what: str) -> ModelTableError:
        return ModelTableError(
            f"{self.where} is corrupt: {what}; load another version (version=...) or save the "
            f"model again"
        )

    def write_chunk(
        self, tf: _TargetFile, rel: str, index: int, offset: int, mv: memoryview, sha: str
    ) -> None:
        got = hashlib.sha256(mv).hexdigest()
        if got != sha:
            raise ChecksumError(
                f"{self.where} is corrupt: chunk {index} of file {rel!r} (offset {offset}, "
                f"{len(mv)} bytes) has sha256 {got} but the table records {sha}; nothing was "
                f"written to the cache. Load another version (version=...) or save the model again"
            )
        done = 0
        while done < len(mv):
            done += os.pwrite(tf.fd, mv[done:], offset + done)
        with self.lock:
            tf.written += len(mv)
            if tf.written == tf.size:  # every byte of the file is in: free its descriptor
                os.close(tf.fd)
                tf.fd = -1

    def submit(self, batch, parquet_path: str) -> list[Future]:
        """Check one record batch's rows and queue their chunks; return the write futures."""
        import pyarrow as pa

        data = batch.column("data")
        if data.null_count:
            raise self._corrupt(f"{parquet_path} has null chunk data")
        if not (pa.types.is_binary(data.type) or pa.types.is_large_binary(data.type)):
            raise self._corrupt(f"{parquet_path} has chunk data of type {data.type}, not binary")
        # Zero-copy: slice the Arrow data buffer instead of making a bytes object per chunk.
        _, obuf, dbuf = data.buffers()
        otype = pa.int64() if pa.types.is_large_binary(data.type) else pa.int32()
        bounds = pa.Array.from_buffers(
            otype, len(data) + 1, [None, obuf], offset=data.offset
        ).to_pylist()
        blob = memoryview(dbuf) if dbuf is not None else memoryview(b"")
        cols = [batch.column(c).to_pylist() for c in _COLUMNS[:-1]]
        futures = []
        for i, (rel, index, offset, length, sha, size, fdigest) in enumerate(zip(*cols)):
            tf = self.files.get(rel)
            if tf is None:
                _safe_rel(rel, self.where)
                dest = os.path.join(self.target, *rel.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
                tf = self.files[rel] = _TargetFile(os.open(dest, flags, 0o644), size)
            start, end = bounds[i], bounds[i + 1]
            if (
                end - start != length
                or size != tf.size
                or offset < 0
                or offset + length > tf.size
                or tf.submitted + length > tf.size
                or index in tf.chunks
            ):
                raise self._corrupt(
                    f"chunk {index} of file {rel!r} (offset {offset}, length {length}, file size "
                    f"{size}) does not fit the file's other chunks"
                )
            tf.chunks[index] = (offset, length, bytes.fromhex(sha))
            tf.submitted += length
            if fdigest is not None:
                tf.expected = fdigest
            futures.append(
                self.pool.submit(self.write_chunk, tf, rel, index, offset, blob[start:end], sha)
            )
        return futures

    def verify(self, info: dict[str, Any]) -> None:
        """Every file complete and matching its digest; file and byte counts as committed."""
        for rel, tf in self.files.items():
            order = sorted(tf.chunks)
            position, contiguous = 0, order == list(range(len(order)))
            for index in order:
                offset, length, _ = tf.chunks[index]
                contiguous = contiguous and offset == position
                position += length
            if not contiguous or position != tf.size or tf.written != tf.size:
                raise self._corrupt(
                    f"file {rel!r} has {position} of its {tf.size} bytes in chunks "
                    f"{order[:5]}{'...' if len(order) > 5 else ''}"
                )
            digest = hashlib.sha256(b"".join(tf.chunks[i][2] for i in order)).hexdigest()
            if digest != tf.expected:
                raise ChecksumError(
                    f"{self.where} is corrupt: file {rel!r} has digest {digest} but the table "
                    f"records {tf.expected}; nothing was written to the cache. Load another "
                    f"version (version=...) or save the model again"
                )
        want_files, want_bytes = info.get("files"), info.get("bytes")
        got_bytes = sum(tf.size for tf in self.files.values())
        if (want_files is not None and want_files != len(self.files)) or (
            want_bytes is not None and want_bytes != got_bytes
        ):
            raise self._corrupt(
                f"its commit records {want_files} files / {want_bytes} bytes but its data files "
                f"hold {len(self.files)} files / {got_bytes} bytes (a data file may be missing)"
            )


def _materialise(dt, table: Any, uri: str, version: int, target: str) -> None:
    where = f"{_describe(table, uri)} version {version}"
    info = _commit_info(uri, version)
    with ThreadPoolExecutor(_threads(), thread_name_prefix="model-table-load") as pool:
        m = _Materialiser(where, target, pool)
        futures: list[Future] = []
        try:
            previous: list[Future] = []
            for parquet_path, group in _iter_row_groups(dt.file_uris(), where):
                current = []
                for batch in group.to_batches():
                    current.extend(m.submit(batch, parquet_path))
                futures = previous + current
                # Two row groups in flight keep every thread busy across the boundary; waiting
                # for the older one keeps memory bounded.
                for fut in previous:
                    fut.result()
                previous = current
            futures = previous
            for fut in previous:
                fut.result()
            m.verify(info)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        finally:
            pool.shutdown(wait=True)
            m.close()


# --------------------------------------------------------------------------------------------
# History and Spark


def model_table_history(
    table: str | os.PathLike[str], *, warehouse: str | None = None
) -> list[dict]:
    """The versions of a model table, newest first.

    Args:
        table: ``"ai_model.llama2_300"``, a path or a URI (see :func:`resolve_table_uri`).
        warehouse: root for names, as in :func:`resolve_table_uri`.

    Returns:
        One dict per version: ``version`` (int), ``timestamp`` (UTC datetime), ``operation``
        (the Delta operation), ``files`` and ``bytes`` (of the model directory saved),
        ``chunk_size``, ``source`` (the directory saved) and ``metadata`` (the dict given to
        :func:`save_model_table`). Commits not made by :func:`save_model_table` (an OPTIMIZE,
        say) have ``None`` for files/bytes and empty metadata.

    Raises:
        ModelNotFoundError: no table there.
        ModelTableError: the location holds a Delta table that is not a model table.

    Example:
        >>> [h["version"] for h in model_table_history("ai_model.smollm2")]  # doctest: +SKIP
        [1, 0]
    """
    uri = resolve_table_uri(table, warehouse)
    dt = _open(table, uri, None)
    out = []
    for entry in dt.history():
        info = entry.get(_COMMIT_KEY)
        info = info if isinstance(info, dict) else {}
        ts = entry.get("timestamp")
        when = datetime.fromtimestamp(ts / 1000, tz=timezone.utc) if ts is not None else None
        out.append(
            {
                "version": int(entry["version"]),
                "timestamp": when,
                "operation": entry.get("operation"),
                "files": info.get("files"),
                "bytes": info.get("bytes"),
                "chunk_size": info.get("chunkSize"),
                "source": info.get("source"),
                "metadata": info.get("metadata", {}),
            }
        )
    out.sort(key=lambda h: h["version"], reverse=True)
    return out


def _spark_has_delta(spark) -> bool:
    try:
        extensions = spark.conf.get("spark.sql.extensions", "") or ""
        catalog = spark.conf.get("spark.sql.catalog.spark_catalog", "") or ""
    except Exception:  # noqa: BLE001 - a conf we cannot read means no Delta configured
        return False
    return "DeltaSparkSessionExtension" in extensions or "DeltaCatalog" in catalog


def _spark_path(uri: str) -> str:
    if uri.startswith("s3://"):  # Hadoop's S3 connector is s3a://; delta-rs says s3://
        return "s3a://" + uri[len("s3://") :]
    if not _URI_RE.match(uri):  # a local path: say so, or Spark resolves it on fs.defaultFS
        from pathlib import Path

        return Path(uri).as_uri()
    return uri


def read_model_table(
    spark,
    table: str | os.PathLike[str],
    *,
    version: int | None = None,
    warehouse: str | None = None,
):
    """The chunk rows of a model table version as a Spark DataFrame.

    With Delta configured in the session (``spark.sql.extensions`` has
    ``DeltaSparkSessionExtension``) this is ``spark.read.format("delta")`` with ``versionAsOf``.
    Without the Delta jars, the version's data files are taken from the Delta log (through
    delta-rs) and read with ``spark.read.parquet``, so Byzer's ``load model.`...` as t`` shape
    works from any session.

    Args:
        spark: a SparkSession.
        table: ``"ai_model.llama2_300"``, a path or a URI (see :func:`resolve_table_uri`).
        version: the table version; None for the latest.
        warehouse: root for names, as in :func:`resolve_table_uri`.

    Returns:
        A DataFrame with columns path, chunk_index, offset, length, sha256, file_size,
        file_digest, data (see the module docstring).

    Raises:
        ModelNotFoundError: no table there, or no such version.
        ModelTableError: the location holds a Delta table that is not a model table.

    Example:
        >>> df = read_model_table(spark, "ai_model.smollm2")  # doctest: +SKIP
        >>> df.groupBy("path").agg({"length": "sum"}).show()  # doctest: +SKIP
    """
    version = _check_version(version)
    uri = resolve_table_uri(table, warehouse)
    dt = _open(table, uri, version)
    if _spark_has_delta(spark):
        reader = spark.read.format("delta").option("versionAsOf", dt.version())
        return reader.load(_spark_path(uri)).select(*_COLUMNS)
    files = [_spark_path(f) for f in dt.file_uris()]
    if not files:
        return spark.createDataFrame([], _SPARK_DDL)
    return spark.read.schema(_SPARK_DDL).parquet(*files).select(*_COLUMNS)
