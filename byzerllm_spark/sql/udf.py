"""The executor side of a model function: Spark's Arrow batches in, answers out, in order.

Shapes at each step: Spark hands a task an iterator of ``pa.Array`` (string, the ``llm_param`` JSON,
one per Arrow batch of ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows) → each is cut into
chunks of ``batch_size`` rows → each chunk is one Arrow request (:mod:`..transport`), ``concurrency``
in flight → the answers (``string``, or ``struct<response, error, metadata>``) are yielded in input order.
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..errors import ConfigError, ModelNotFoundError, RequestError


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


def run_requests(batches, *, model, endpoint, batch_size, concurrency, timeout, max_retries, fail_on_error):
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..protocol import arrow
    from ..transport import post_arrow

    def submit(chunk):
        chunk = as_request_json(chunk)
        body = arrow.encode_params(chunk)
        try:
            table = arrow.decode_results(
                post_arrow(endpoint, model, body, timeout=timeout, max_retries=max_retries)
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
        if fail_on_error:
            errors = table.column("error")
            if errors.null_count != len(errors):
                first = next(i for i, e in enumerate(errors.to_pylist()) if e)
                raise RequestError(
                    f"model {model!r} could not answer a row ({errors[first].as_py()}); request: "
                    f"{chunk[first].as_py()[:300]}. Register the function with fail_on_error=False to get "
                    "per-row errors instead of failing the query."
                )
            return table.column("response").combine_chunks()
        fields = [table.column(name).combine_chunks() for name in ("response", "error", "metadata")]
        # A null row (null input, or a null instruction) comes back with all three fields null.
        mask = pc.and_(pc.and_(fields[0].is_null(), fields[1].is_null()), fields[2].is_null())
        return pa.StructArray.from_arrays(fields, names=["response", "error", "metadata"], mask=mask)

    yield from windowed(batches, submit, concurrency, batch_size)


def run_embeddings(batches, *, model, endpoint, batch_size, concurrency, timeout, max_retries, fail_on_error):
    import pyarrow as pa

    from ..protocol import arrow
    from ..transport import post_arrow

    def submit(chunk):
        if pa.types.is_large_string(chunk.type):
            chunk = chunk.cast(pa.string())
        body = arrow.encode_params(chunk)
        table = arrow.decode_results(
            post_arrow(endpoint, model, body, route="embed", timeout=timeout, max_retries=max_retries)
        )
        errors = [e for e in table.column("error").to_pylist() if e]
        if errors and fail_on_error:
            raise RequestError(f"model {model!r} could not embed a row: {errors[0]}")
        return table.column("embedding").combine_chunks()

    yield from windowed(batches, submit, concurrency, batch_size)
