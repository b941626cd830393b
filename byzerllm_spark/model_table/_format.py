"""The model table format: columns, Arrow schema, chunk and file sizes, the commit entry.

A model directory is kept as a Delta table with one row per chunk of each file::

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

Each save is one Delta commit whose commit info carries a ``byzerllm`` entry (``COMMIT_KEY``):
``format``, ``saveId``, ``files``, ``bytes``, ``chunkSize``, ``source`` and the caller's
``metadata``.

Why 4 MiB chunks (the default): a Parquet page and an Arrow ``binary`` array hold at most 2 GiB
(int32 sizes and offsets); Spark's vectorized reader puts a whole row group's batch in column
vectors indexed by int, a Spark row must stay well under 2 GB, and a row sent to the driver or
over Spark Connect must fit a 128 MiB message; and every reader holds a whole row group in
memory. Chunks of 4 MiB, two to a row group (8 MiB), keep all of these far below their limits
and keep save and load memory to a few row groups, while the cost per chunk (a hash call, a
write call, a row) is negligible at 256 rows per GB. Larger chunks (up to 256 MiB) are
accepted; each then gets its own row group.
"""

from __future__ import annotations

import os

DEFAULT_CHUNK_SIZE = 4 << 20
"""Bytes per chunk row (4 MiB); see the module docstring for why."""

MAX_CHUNK_SIZE = 256 << 20
"""Largest chunk accepted: far below the 2 GiB Parquet/Arrow limits, and one row per row group."""

MIN_CHUNK_SIZE = 1 << 10

ROW_GROUP_BYTES = 8 << 20  # bytes of chunk data per Parquet row group (and per save batch)
FILE_BYTES = 256 << 20  # roll to a new Parquet file after this many bytes
COMMIT_KEY = "byzerllm"  # key of our entry in the Delta commit info
FORMAT = "byzerllm-model-table/1"

COLUMNS = ("path", "chunk_index", "offset", "length", "sha256", "file_size", "file_digest", "data")
SPARK_DDL = (
    "path STRING, chunk_index BIGINT, offset BIGINT, length BIGINT, sha256 STRING, "
    "file_size BIGINT, file_digest STRING, data BINARY"
)


def threads() -> int:
    """Worker threads for reading, hashing and writing chunks (preadv, sha256 release the GIL)."""
    return max(2, min(4, os.cpu_count() or 2))


def arrow_schema():
    """The Arrow schema of the chunk rows (``pyarrow.Schema``, columns in ``COLUMNS`` order)."""
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


def progress_bar(total_bytes: int, desc: str):
    """A bytes bar for a save or load: shown after 2 s on a terminal or in a notebook, never in logs."""
    from tqdm.auto import tqdm

    from ..settings import progress_disable

    return tqdm(total=total_bytes or None, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=progress_disable(), delay=2.0)
