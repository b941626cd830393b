"""Loading a model table version into a local directory: streamed, verified, cached per node.

    Delta log ──file list──▶ part-*.parquet ──one row group at a time (prefetch thread)──▶
      chunks checked (sha256, offsets) ──pwrite (thread pool)──▶ <cache>/<table key>/.vN.tmp-*
      ──every file's digest and the commit's counts checked──▶ rename to <cache>/<table key>/vN

The cache key is the table location plus its Delta table id, so a table deleted and saved again
at the same place never serves the old one's files. A file lock (``filelock``) per version makes
concurrent loads on one node wait for each other instead of copying twice; the lock is released
if its holder dies.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from filelock import FileLock

from .. import settings
from ..errors import ChecksumError, ConfigError, ModelTableError, bad_value
from ._format import COLUMNS, progress_bar, threads
from ._open import Snapshot, check_version, open_snapshot
from .names import TableRef, filesystem, is_uri, locate

__all__ = ["load", "load_model_table"]


def load_model_table(
    table: str | os.PathLike[str],
    *,
    version: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    warehouse: str | os.PathLike[str] | None = None,
) -> str:
    """Materialise a model table version as a local directory, verified and cached.

    Chunks are streamed one row group at a time (bounded memory), every chunk's sha256 and
    every file's digest is checked, and the files are written to a temporary directory that is
    renamed into place only when all of it is verified. The result is cached per node by
    table location, table id and version: a second load of the same version returns at once.
    Concurrent loads of one version on a node wait for each other instead of copying twice.

    Args:
        table: ``"ai_model.llama2_300"``, a path or a URI (see ``resolve_table_uri``).
        version: the table version to load (int >= 0); default None: the latest.
        cache_dir: local directory of materialised versions; default None:
            ``$BYZERLLM_MODEL_CACHE``, else ``~/.byzerllm_spark/model_cache``.
        warehouse: root for names, as in ``resolve_table_uri``; default None.

    Returns:
        The path (str) of the local model directory, ``<cache_dir>/<table key>/v<version>``.
        Do not modify it: it is the cache.

    Raises:
        ModelNotFoundError: no table there, or no such version.
        ChecksumError: a chunk or a file does not match its recorded digest (nothing is left
            in the cache).
        ModelTableError: the table is not a model table, the version is incomplete, or
            delta-rs failed to read it.
        ConfigError: a bad ``table``, ``version`` or ``cache_dir``.

    Example:
        >>> path = load_model_table("ai_model.smollm2", version=0)  # doctest: +SKIP
        >>> sorted(os.listdir(path))  # doctest: +SKIP
        ['config.json', 'model.safetensors', 'tokenizer.json']
    """
    return load(locate(table, warehouse), version=version, cache_dir=cache_dir)


def load(
    ref: TableRef, *, version: int | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> str:
    """:func:`load_model_table` for a located table."""
    version = check_version(version)
    root = _cache_root(cache_dir)
    snap = open_snapshot(ref, version)
    key_dir = os.path.join(root, _cache_key(ref.uri, snap.table_id()))
    final = os.path.join(key_dir, f"v{snap.version}")
    if os.path.isdir(final):
        return final
    os.makedirs(key_dir, exist_ok=True)
    with FileLock(os.path.join(key_dir, f".v{snap.version}.lock")):
        if os.path.isdir(final):  # another process materialised it while we waited
            return final
        # Under the lock every temporary directory of this version belongs to a dead process.
        prefix = f".v{snap.version}.tmp-"
        for name in os.listdir(key_dir):
            if name.startswith(prefix):
                shutil.rmtree(os.path.join(key_dir, name), ignore_errors=True)
        tmp = os.path.join(key_dir, f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            _materialise(snap, tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> str:
    if cache_dir is None:
        return settings.model_cache_dir()
    if isinstance(cache_dir, os.PathLike):
        cache_dir = os.fspath(cache_dir)
    if not isinstance(cache_dir, str) or not cache_dir.strip() or is_uri(cache_dir):
        raise ConfigError(bad_value("cache_dir", cache_dir, "pass a local directory"))
    return os.path.abspath(os.path.expanduser(cache_dir))


def _cache_key(uri: str, table_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:64] or "table"
    digest = hashlib.sha256(f"{uri}\0{table_id}".encode()).hexdigest()[:16]
    return f"{name}-{digest}"


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
                fs, inner = filesystem(path)
                with fs.open_input_file(inner) as handle:
                    pf = pq.ParquetFile(handle)
                    for rg in range(pf.metadata.num_row_groups):
                        if not put((path, pf.read_row_group(rg, columns=list(COLUMNS)))):
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
        cols = [batch.column(c).to_pylist() for c in COLUMNS[:-1]]
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


def _materialise(snap: Snapshot, target: str) -> None:
    """Write every file of ``snap`` into ``target``, verified; raise on the first fault."""
    import pyarrow.compute as pc

    where = snap.where
    info = snap.commit_info()
    bar = progress_bar(int(info.get("bytes") or 0), f"load {where}")
    with ThreadPoolExecutor(threads(), thread_name_prefix="model-table-load") as pool:
        m = _Materialiser(where, target, pool)
        futures: list[Future] = []
        try:
            previous: list[Future] = []
            for parquet_path, group in _iter_row_groups(snap.file_uris(), where):
                current = []
                for batch in group.to_batches():
                    current.extend(m.submit(batch, parquet_path))
                    bar.update(pc.sum(batch.column("length")).as_py() or 0)
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
            bar.close()
