"""Saving a model directory as a new version of a model table: the save pipeline.

    model_dir ──scan──▶ files ──plan──▶ chunks (4 MiB) in row groups (8 MiB)
      ──read+sha256 (thread pool, preadv)──▶ RecordBatch over a reused buffer
      ──ParquetWriter (one writer thread)──▶ part-*.parquet under the table
      ──one Delta commit (delta-rs transaction API)──▶ version n

Why the table is written this way: ``deltalake.write_deltalake`` buffers what it writes (about
2.5x the data in RSS, measured with deltalake 1.6), so the Parquet files are streamed here with
``pyarrow.parquet.ParquetWriter``, one row group at a time, and committed with delta-rs's
transaction API (``create_table_with_add_actions`` / ``create_write_transaction``). Each save is
one commit, so a save killed halfway leaves only unreferenced files behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import stat
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, ModelTableError, bad_value
from . import _format
from ._format import (
    COLUMNS,
    COMMIT_KEY,
    DEFAULT_CHUNK_SIZE,
    FORMAT,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    arrow_schema,
    threads,
)
from ._open import delta_error, delta_errors, open_latest
from .names import TableRef, filesystem, is_uri, local_path, locate

__all__ = ["save", "save_model_table"]

_EMPTY_SHA256 = hashlib.sha256(b"").digest()
_COMMIT_ATTEMPTS = 5  # a new table raced by another save, then concurrent overwrites


def save_model_table(
    model_dir: str | os.PathLike[str],
    table: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    mode: str = "overwrite",
    warehouse: str | os.PathLike[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """Save a model directory as a new version of a Delta model table.

    Files are streamed in chunks (memory stays bounded whatever the model size), each chunk
    hashed with sha256, and the version is committed atomically: a save that dies halfway leaves
    the previous version as it was. Saves racing on one table (even a new one) each commit their
    own version; a conflict delta-rs cannot resolve raises ModelTableError saying to retry.

    Args:
        model_dir: local directory (str or ``os.PathLike``) with the model files;
            subdirectories and symlinks inside it (and, for a Hugging Face snapshot, into its cache
            repo's ``blobs/``) are followed; a symlink that leaves it is refused.
        table: ``"ai_model.llama2_300"``, a path or a URI (see ``resolve_table_uri``).
        metadata: JSON-serialisable dict kept with this version (model type, base model,
            training parameters...); returned by ``model_table_history``. Default None: ``{}``.
        mode: ``"overwrite"`` (default) writes a new version, creating the table if needed;
            ``"error"`` refuses to write to an existing table.
        warehouse: root for names, as in ``resolve_table_uri``; default None.
        chunk_size: bytes per chunk row (int), 1 KiB to 256 MiB; default 4 MiB.

    Returns:
        The version just written (int; 0 for a new table).

    Raises:
        ConfigError: ``model_dir`` is missing, not a directory or empty; or a bad ``table``,
            ``mode``, ``chunk_size`` or ``metadata``.
        ModelTableError: the table exists and ``mode="error"``, the location holds a Delta table
            that is not a model table, a symlink leaves ``model_dir``, a file changed while it was
            read, or the commit failed
            (a conflict with a concurrent writer: retry).

    Example:
        >>> import pathlib, tempfile
        >>> work = pathlib.Path(tempfile.mkdtemp())
        >>> (work / "model").mkdir(); (work / "model" / "config.json").write_text("{}")
        2
        >>> save_model_table(work / "model", work / "table", metadata={"base": "SmolLM2-135M"})
        0
        >>> save_model_table(work / "model", work / "table")  # the next version
        1
    """
    return save(
        locate(table, warehouse), model_dir, metadata=metadata, mode=mode, chunk_size=chunk_size
    )


def save(
    ref: TableRef,
    model_dir: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    mode: str = "overwrite",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> int:
    """:func:`save_model_table` for a located table: check, write the data files, commit."""
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
    _check_target(ref, mode)  # fail before writing gigabytes
    sink = _write_data_files(ref, files, chunk_size)
    # From here on the data files are kept even if the commit fails: once the commit may have
    # reached the log, deleting them could break the version it made.
    info = {
        "format": FORMAT,
        "saveId": uuid.uuid4().hex,
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "chunkSize": chunk_size,
        "source": src,
        "metadata": user_meta,
    }
    return _commit(ref, sink.adds, info, mode)


def _check_target(ref: TableRef, mode: str):
    """The latest snapshot of the table (None when new); refuses what ``mode`` forbids."""
    current = open_latest(ref, writing=True)
    if current is not None and mode == "error":
        raise ModelTableError(
            f"{ref} already exists (version {current.version()}); pass mode='overwrite' to write "
            f"a new version"
        )
    return current


def _write_data_files(ref: TableRef, files: list[_SourceFile], chunk_size: int) -> _ParquetSink:
    """Stream every chunk of ``files`` into Parquet files under the table (not committed)."""
    import pyarrow as pa

    schema = arrow_schema()
    fs, root = filesystem(ref.uri)
    fs.create_dir(root, recursive=True)
    sink = _ParquetSink(ref.uri, schema)
    rows_per_group = max(1, _format.ROW_GROUP_BYTES // chunk_size)
    bar = _format.progress_bar(sum(f.size for f in files), f"save {ref}")
    try:
        with ThreadPoolExecutor(threads(), thread_name_prefix="model-table-read") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="model-table-write") as writer:
            # Three buffers in turn: batch n+1 is read and hashed while batch n is collected and
            # batch n-1 is encoded by the writer. Memory stays at three row groups whatever
            # the model size, and reusing buffers saves the page faults of fresh allocations.
            buffers = [pa.allocate_buffer(rows_per_group * chunk_size) for _ in range(3)]
            pending: Future | None = None
            reading: _PendingBatch | None = None
            reading_plan: list[tuple] = []
            plans = _batched(_chunk_plan(files, chunk_size), rows_per_group)
            for n, plan in enumerate(itertools.chain(plans, [None])):
                ahead = _PendingBatch(plan, pool, buffers[n % 3]) if plan is not None else None
                if reading is not None:
                    batch, meta = reading.collect(pa, schema)
                    bar.update(sum(item[3] for item in reading_plan))
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(sink.write, batch, meta)
                reading, reading_plan = ahead, plan
            if pending is not None:
                pending.result()
        sink.close_file()
    except BaseException:
        sink.abort()  # nothing refers to these files yet: remove them
        raise
    finally:
        bar.close()
    return sink


def _commit(ref: TableRef, adds: list[Any], info: dict[str, Any], mode: str) -> int:
    """Commit ``adds`` as one new version; return the version it got.

    Two saves of a new table may both find no table and both try to create it: the one that
    loses finds the table the other created and commits its files as the next version instead
    (with ``mode="overwrite"``; with ``mode="error"`` it gets "already exists"). A conflict on an
    existing table is retried the same way: an overwrite replaces every file, so it does not
    depend on what the other writer committed.
    """
    from deltalake.exceptions import CommitFailedError, DeltaError

    props = {COMMIT_KEY: info}
    lost: Exception | None = None
    for _ in range(_COMMIT_ATTEMPTS):
        current = _check_target(ref, mode)
        try:
            _commit_once(ref, current, adds, props)
            return _version_of_save(ref, info["saveId"])
        except (DeltaError, OSError) as exc:
            raced = isinstance(exc, CommitFailedError) or (
                current is None and open_latest(ref) is not None
            )
            if not raced:
                raise delta_error(ref, "committing the new version", exc) from exc
            landed = _find_save(ref, info["saveId"])
            if landed is not None:
                return landed
            lost = exc
    raise delta_error(ref, f"committing the new version ({_COMMIT_ATTEMPTS} tries)", lost) from lost


def _commit_once(ref: TableRef, current, adds: list[Any], custom_metadata: dict) -> None:
    """One delta-rs commit: create the table with ``adds``, or overwrite ``current`` with them."""
    from deltalake import Schema
    from deltalake.transaction import CommitProperties, create_table_with_add_actions

    schema = arrow_schema()
    if current is not None:
        # delta-rs's conflict checker may retry an overwrite itself: a concurrent overwrite
        # deleted what this one read, so it fails with CommitFailedError instead of merging.
        current.create_write_transaction(
            adds,
            mode="overwrite",
            schema=schema,
            commit_properties=CommitProperties(custom_metadata=custom_metadata),
        )
        return
    # No retries: delta-rs would commit a create that lost the race for version 0 as version 1,
    # a second CREATE TABLE (new table id) adding its files to the winner's (deltalake 1.6).
    create_table_with_add_actions(
        ref.uri,
        Schema.from_arrow(schema),
        adds,
        mode="error",
        name=os.path.basename(ref.uri.rstrip("/")) or None,
        description="byzerllm-spark model table: one row per chunk of each model file",
        commit_properties=CommitProperties(custom_metadata=custom_metadata, max_commit_retries=0),
    )


def _find_save(ref: TableRef, save_id: str) -> int | None:
    """The version whose commit carries ``save_id``, or None."""
    current = open_latest(ref)
    if current is None:
        return None
    with delta_errors(ref, "reading the table history"):
        history = current.history()
    for entry in history:
        info = entry.get(COMMIT_KEY)
        if isinstance(info, dict) and info.get("saveId") == save_id:
            return int(entry["version"])
    return None


def _version_of_save(ref: TableRef, save_id: str) -> int:
    """The version our commit got (another writer may have committed right after us)."""
    version = _find_save(ref, save_id)
    if version is None:  # pragma: no cover - the log lost a commit just made
        raise ModelTableError(f"the commit of this save is missing from the log of {ref}")
    return version


def _source_dir(model_dir: Any) -> str:
    if isinstance(model_dir, os.PathLike):
        model_dir = os.fspath(model_dir)
    if not isinstance(model_dir, str) or not model_dir.strip():
        raise ConfigError(bad_value("model_dir", model_dir, "pass the model's local directory"))
    path = local_path(model_dir) if model_dir.startswith("file://") else model_dir
    if path is None or is_uri(path):
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


@dataclass
class _SourceFile:
    rel: str
    abspath: str
    size: int
    digests: list[bytes] = field(default_factory=list)


def _link_boundary(model_dir: str) -> str:
    """The folder symlinks under ``model_dir`` may point into: the model directory itself, or, for a
    Hugging Face cache snapshot (``models--org--name/snapshots/<rev>``, whose files are links to
    ``../../blobs/<sha>``), that cache repo folder."""
    real = os.path.realpath(model_dir)
    parent = os.path.dirname(os.path.abspath(model_dir))
    if os.path.basename(parent) == "snapshots" and os.path.basename(os.path.dirname(parent)).startswith("models--"):
        return os.path.realpath(os.path.dirname(parent))
    return real


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _outside_link_error(link: str, target: str, model_dir: str) -> ModelTableError:
    return ModelTableError(
        f"{link!r} in model_dir={model_dir!r} is a symlink to {target!r}, outside the model directory; "
        "links that leave the model directory are never followed (a link to '/' or to a file elsewhere "
        "would copy the rest of the machine into the table): copy the file into the model directory "
        "(or remove the link) and save again"
    )


def _scan_model_dir(model_dir: str) -> list[_SourceFile]:
    """Regular files under ``model_dir``. Symlinks are followed while they stay inside the model
    directory (or a Hugging Face snapshot's cache repo, see :func:`_link_boundary`); one that leaves it
    raises :class:`ModelTableError` naming the link and its target."""
    files: list[_SourceFile] = []
    boundary = _link_boundary(model_dir)
    for root, dirs, names in os.walk(model_dir, followlinks=True):
        real = os.path.realpath(root)
        for d in dirs:
            target = os.path.realpath(os.path.join(root, d))
            if not _inside(target, boundary):
                raise _outside_link_error(os.path.join(root, d), target, model_dir)
        # A symlinked directory that leads back to an ancestor would make the walk endless.
        dirs[:] = sorted(d for d in dirs if not _inside(real, os.path.realpath(os.path.join(root, d))))
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, model_dir).replace(os.sep, "/")
            if os.path.islink(full) and os.path.exists(full) and not _inside(os.path.realpath(full), boundary):
                raise _outside_link_error(full, os.path.realpath(full), model_dir)
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


class _ParquetSink:
    """Writes row groups into Parquet files under the table, rolling at ``FILE_BYTES``."""

    def __init__(self, uri: str, schema) -> None:
        self.fs, self.root = filesystem(uri)
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
        if self._bytes >= _format.FILE_BYTES:
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
            "nullCount": {c: 0 for c in COLUMNS if c not in ("file_digest", "data")}
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
