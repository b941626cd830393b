"""The Arrow wire format of ``POST {endpoint}/{model}/arrow``.

Request: an Arrow IPC stream; one row per request; column ``params`` (string, the request as JSON,
null allowed). Response: an Arrow IPC stream with the same number of rows in the same order:
``response`` (string), ``error`` (string), ``metadata`` (map<string, string>). A null ``params``
gives a row with all three null. Spark, ``bls.chat`` and the JVM bridge all speak this.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

CONTENT_TYPE = "application/vnd.apache.arrow.stream"
REQUEST_SCHEMA = pa.schema([("params", pa.string())])
METADATA_TYPE = pa.map_(pa.string(), pa.string())
RESPONSE_SCHEMA = pa.schema(
    [("response", pa.string()), ("error", pa.string()), ("metadata", METADATA_TYPE)]
)
EMBEDDING_SCHEMA = pa.schema([("embedding", pa.list_(pa.float32())), ("error", pa.string())])
#: ``POST {endpoint}/{model}/tokenize``: the same ``params`` request (text, or request JSON whose
#: ``instruction`` is counted); answers ``tokens`` (int32, the text's tokens) and ``error`` per row.
TOKENS_SCHEMA = pa.schema([("tokens", pa.int32()), ("error", pa.string())])


def _write(table_or_batch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table_or_batch.schema) as writer:
        writer.write(table_or_batch)
    return sink.getvalue().to_pybytes()


def encode_params(params_json: Sequence[str | None] | pa.Array) -> bytes:
    """Encode request JSON strings (None for a null row) as an Arrow IPC stream."""
    array = params_json if isinstance(params_json, (pa.Array, pa.ChunkedArray)) else pa.array(params_json, pa.string())
    return _write(pa.table([array], schema=REQUEST_SCHEMA))


def decode_params(body: bytes) -> pa.Array:
    """Decode a request body into its ``params`` column.

    Raises:
        ValueError: the body is not an Arrow IPC stream or has no ``params`` string column.
    """
    try:
        table = pa.ipc.open_stream(body).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"the body is not an Arrow IPC stream ({exc}); send one with a 'params' column") from None
    if "params" not in table.column_names:
        raise ValueError(f"the Arrow body has columns {table.column_names}; it needs a 'params' string column")
    column = table.column("params")
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise ValueError(f"column 'params' has type {column.type}; send the request JSON as strings")
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    try:
        column.validate(full=True)  # invalid UTF-8 is the sender's mistake, found before any row is read
    except pa.ArrowInvalid as exc:
        raise ValueError(f"column 'params' is not valid: {exc}; send UTF-8 text") from None
    return column


def encode_results(responses: Sequence, errors: Sequence, metadata: Iterable) -> bytes:
    """Encode answers; ``metadata`` is a sequence of dicts (or None)."""
    batch = pa.record_batch(
        [pa.array(responses, pa.string()), pa.array(errors, pa.string()), _map_array(metadata)],
        schema=RESPONSE_SCHEMA,
    )
    return _write(batch)


def _map_array(metadata: Iterable) -> pa.Array:
    """dicts (or None) -> map<string,string>, built from flat keys/values (pa.array on a list of
    item lists costs several microseconds a row; this is the per-row hot path of every answer)."""
    offsets = [0]
    keys: list = []
    values: list = []
    nulls: list = []
    total = 0
    for m in metadata:
        if m is None:
            nulls.append(True)
        else:
            nulls.append(False)
            keys.extend(m.keys())
            values.extend(m.values())
            total += len(m)
        offsets.append(total)
    mask = pa.array(nulls, pa.bool_()) if any(nulls) else None
    return pa.MapArray.from_arrays(
        # numpy first: pa.array() on a list of Python ints costs ~7 us an element (pyarrow 26).
        pa.array(np.asarray(offsets, dtype=np.int32)), _strings(keys), _strings(values),
        type=METADATA_TYPE, mask=mask,
    )


def _strings(items: list) -> pa.Array:
    """A string array; items that are not strings (a plugin's int token count) become their str()."""
    try:
        return pa.array(items, pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return pa.array([None if x is None else str(x) for x in items], pa.string())


def decode_results(body: bytes) -> pa.Table:
    """Decode a response body into a table with ``response``, ``error`` and ``metadata`` columns."""
    return pa.ipc.open_stream(body).read_all()


def encode_embeddings(vectors: Sequence, errors: Sequence) -> bytes:
    batch = pa.record_batch(
        [pa.array(vectors, pa.list_(pa.float32())), pa.array(errors, pa.string())], schema=EMBEDDING_SCHEMA
    )
    return _write(batch)


def encode_token_counts(counts: Sequence, errors: Sequence) -> bytes:
    """Encode the answer of the ``tokenize`` route (:data:`TOKENS_SCHEMA`)."""
    batch = pa.record_batch([pa.array(counts, pa.int32()), pa.array(errors, pa.string())], schema=TOKENS_SCHEMA)
    return _write(batch)
