"""The executor side of a model function: Spark's Arrow batches in, answers out, in order.

Shapes at each step: Spark hands a task an iterator of ``pa.Array`` (string, the ``llm_param`` JSON,
one per Arrow batch of ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows) → each is cut into
chunks of ``batch_size`` rows → each chunk is one Arrow request (:mod:`..transport`), ``concurrency``
in flight → the answers (``string``, or ``struct<response, error, metadata>``) are yielded in input order.

What a query cost goes back to the driver on a Spark accumulator (:class:`QueryCounters`): each task adds
its rows, requests, errors, retries and tokens once, when its last answer is out.
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..errors import ConfigError, ModelNotFoundError, RequestError

#: The counters of a query, in the order :class:`QueryCounters` keeps them.
STAT_FIELDS = ("rows", "requests", "errors", "retries", "prompt_tokens", "completion_tokens")
_TOKEN_KEYS = ("prompt_tokens", "completion_tokens")


class QueryCounters:
    """The ``AccumulatorParam`` of the model functions: ``{(SQL execution id, model): counts}``, counts in
    :data:`STAT_FIELDS` order. The driver's value gains one entry per query and model. Entries are
    replaced, never changed in place: the driver reads the value while Spark merges finished tasks into it.
    """

    def zero(self, value):
        return {}

    def addInPlace(self, value, other):
        for key, counts in other.items():
            old = value.get(key)
            value[key] = tuple(counts) if old is None else tuple(a + b for a, b in zip(old, counts))
        return value


def counted(results, stats, model: str):
    """Yield the answer arrays of ``(array, counts)`` pairs; add the summed counts to the accumulator
    ``stats`` (None: Spark Connect, which has no accumulators) once, when the task's answers are out."""
    totals = [0] * len(STAT_FIELDS)
    try:
        for array, counts in results:
            for i, count in enumerate(counts):
                totals[i] += count
            yield array
    finally:
        if stats is not None and any(totals):
            from pyspark import TaskContext

            task = TaskContext.get()
            query = task.getLocalProperty("spark.sql.execution.id") if task is not None else None
            stats.add({(query, model): tuple(totals)})


def token_usage(metadata) -> tuple[int, int]:
    """``(prompt_tokens, completion_tokens)`` summed over a chunk's ``metadata`` column (``map<string,
    string>``), as the backends report them; rows without them count 0. Vectorised over the maps' flat
    entries (``pc.map_lookup`` per row took 10x as long)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if metadata.null_count == len(metadata):
        return 0, 0
    totals = [0] * len(_TOKEN_KEYS)
    for chunk in metadata.chunks:
        # .keys/.items ignore a slice's offset; the offsets bound this chunk's own entries.
        start, end = chunk.offsets[0].as_py(), chunk.offsets[-1].as_py()
        keys, items = chunk.keys.slice(start, end - start), chunk.items.slice(start, end - start)
        for i, key in enumerate(_TOKEN_KEYS):
            values = items.filter(pc.equal(keys, key))
            if not len(values):
                continue
            try:
                totals[i] += max(0, pc.sum(values.cast(pa.int64())).as_py() or 0)
            except pa.ArrowInvalid:  # not all integer text: count the values that are
                totals[i] += sum(int(v) for v in values.to_pylist() if v and v.strip().isdigit())
    return totals[0], totals[1]


def windowed(batches, submit, concurrency: int, batch_size: int):
    """Submit every chunk of every input batch, keep ``concurrency`` in flight, yield in order."""
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="byzerllm")
    pending: deque = deque()
    try:
        for array in batches:
            for offset in range(0, len(array), batch_size):
                pending.append(pool.submit(submit, array.slice(offset, batch_size)))
                while len(pending) >= concurrency:
                    yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def as_request_json(array):
    """Rows that are plain text (not a JSON object) become ``{"instruction": text}``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_large_string(array.type):
        array = array.cast(pa.string())
    if not pa.types.is_string(array.type):
        raise ConfigError(
            f"the model function takes the request as a string (llm_param(map(...))), got {array.type}; "
            "wrap the arguments in llm_param(map('instruction', ...))"
        )
    is_json = pc.fill_null(pc.starts_with(pc.utf8_ltrim_whitespace(array), "{"), True)
    if pc.all(is_json).as_py():
        return array
    values = array.to_pylist()
    flags = is_json.to_pylist()
    return pa.array(
        [v if (v is None or ok) else json.dumps({"instruction": v}, ensure_ascii=False) for v, ok in zip(values, flags)],
        pa.string(),
    )


def run_requests(batches, *, model, endpoint, batch_size, concurrency, timeout, max_retries, fail_on_error,
                 stats=None, retry_seconds=None, cache_header=None, structured=None, fallback_endpoint=None):
    """``structured``: ``(response_format JSON, Spark type)`` of a typed model function (``return_type``):
    each row asks for that format and its answer is returned as a value of that type.
    ``fallback_endpoint``: where to send when nothing listens at ``endpoint`` on this executor's host
    (:func:`..transport.local_or_fallback`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..protocol import arrow
    from ..settings import CACHE_HEADER
    from ..transport import last_retries, local_or_fallback, post_arrow

    endpoint = local_or_fallback(endpoint, fallback_endpoint, model)

    headers = {CACHE_HEADER: cache_header} if cache_header else None

    if structured is not None:
        from pyspark.sql.pandas.types import to_arrow_type

        from ._structured import add_response_format, typed_values

        value_type = to_arrow_type(structured[1])

    def submit(chunk):
        chunk = as_request_json(chunk)
        if structured is not None:
            chunk = add_response_format(chunk, structured[0])
        body = arrow.encode_params(chunk)
        try:
            table = arrow.decode_results(
                post_arrow(endpoint, model, body, timeout=timeout, max_retries=max_retries,
                           retry_seconds=retry_seconds, headers=headers)
            )
        except ModelNotFoundError:
            raise
        except RequestError as exc:
            if fail_on_error:
                raise
            # The request itself failed after retries: every non-null row gets the error.
            n = len(chunk)
            valid = chunk.is_valid().to_pylist()
            table = pa.table(
                {
                    "response": pa.nulls(n, pa.string()),
                    "error": pa.array([str(exc) if ok else None for ok in valid], pa.string()),
                    "metadata": pa.nulls(n, arrow.METADATA_TYPE),
                }
            )
        errors = table.column("error")
        if fail_on_error and errors.null_count != len(errors):
            first = next(i for i, e in enumerate(errors.to_pylist()) if e)
            raise RequestError(
                f"model {model!r} could not answer a row ({errors[first].as_py()}); request: "
                f"{chunk[first].as_py()[:300]}. Register the function with fail_on_error=False to get "
                "per-row errors instead of failing the query."
            )
        counts = (len(chunk), 1, len(errors) - errors.null_count, last_retries(),
                  *token_usage(table.column("metadata")))
        if structured is not None:
            return typed(table, chunk, counts)
        if fail_on_error:
            return table.column("response").combine_chunks(), counts
        fields = [table.column(name).combine_chunks() for name in ("response", "error", "metadata")]
        # A null row (null input, or a null instruction) comes back with all three fields null.
        mask = pc.and_(pc.and_(fields[0].is_null(), fields[1].is_null()), fields[2].is_null())
        return pa.StructArray.from_arrays(fields, names=["response", "error", "metadata"], mask=mask), counts

    def typed(table, chunk, counts):
        """The answers (JSON checked by the worker) as values of the declared type; a row that still does
        not convert fails the query, or with fail_on_error=False gets its error beside its raw text."""
        responses = table.column("response").combine_chunks()
        errors = table.column("error").to_pylist()
        texts = [None if e else r for r, e in zip(responses.to_pylist(), errors)]
        values, bad = typed_values(texts, value_type)
        if fail_on_error:
            first = next((i for i, b in enumerate(bad) if b), None)
            if first is not None:
                raise RequestError(f"model {model!r} answered a row that is not a {structured[1].simpleString()} "
                                   f"({bad[first]}); answer: {str(texts[first])[:300]}. Register the function "
                                   "with fail_on_error=False to get per-row errors instead of failing the query.")
            return values, counts
        errors = [e or b for e, b in zip(errors, bad)]
        metadata = table.column("metadata").combine_chunks()
        fields = [responses, pa.array(errors, pa.string()), metadata, values]
        mask = pc.and_(pc.and_(responses.is_null(), fields[1].is_null()), metadata.is_null())
        return pa.StructArray.from_arrays(fields, names=["response", "error", "metadata", "value"], mask=mask), (
            *counts[:2], counts[2] + sum(1 for b in bad if b), *counts[3:])

    yield from counted(windowed(batches, submit, concurrency, batch_size), stats, model)


def run_embeddings(batches, *, model, endpoint, batch_size, concurrency, timeout, max_retries, fail_on_error,
                   stats=None, retry_seconds=None, fallback_endpoint=None):
    import pyarrow as pa

    from ..protocol import arrow
    from ..transport import last_retries, local_or_fallback, post_arrow

    endpoint = local_or_fallback(endpoint, fallback_endpoint, model)

    def submit(chunk):
        if pa.types.is_large_string(chunk.type):
            chunk = chunk.cast(pa.string())
        body = arrow.encode_params(chunk)
        table = arrow.decode_results(
            post_arrow(endpoint, model, body, route="embed", timeout=timeout, max_retries=max_retries,
                       retry_seconds=retry_seconds)
        )
        errors = [e for e in table.column("error").to_pylist() if e]
        if errors and fail_on_error:
            raise RequestError(f"model {model!r} could not embed a row: {errors[0]}")
        return table.column("embedding").combine_chunks(), (len(chunk), 1, len(errors), last_retries(), 0, 0)

    yield from counted(windowed(batches, submit, concurrency, batch_size), stats, model)
