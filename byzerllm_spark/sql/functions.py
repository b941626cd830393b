"""Spark SQL and DataFrame functions: ``SELECT chat(llm_param(map('instruction', q))) FROM t``.

- ``llm_param(map)`` → the request as JSON text, ``llm_prompt(template, array)`` → the template with
  ``{0}``, ``{1}``... filled in. Both are SQL functions (``CREATE TEMPORARY FUNCTION ... RETURN``), so
  they run in the JVM with no Python round trip.
- One function per deployed model: an iterator Arrow UDF that cuts each Spark batch into requests
  of ``batch_size`` rows and keeps ``concurrency`` of them in flight over keep-alive HTTP to
  ``{endpoint}/{model}/arrow``. Results come back in input order; a null input gives a null output.
- ``fail_on_error=False`` returns ``struct<response, error, metadata>`` so one bad row never fails
  the job; ``llm_result(x)`` gives the text from either form.
- What a query cost: ``bls.track(spark)`` and ``bls.last_query_stats()`` read the rows, requests, errors,
  retries and tokens that the executors add to a Spark accumulator (classic PySpark only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError, bad_value, check_int
from ._driver import _stats_accumulator, check_python

RESULT_TYPE_DDL = "struct<response:string,error:string,metadata:map<string,string>>"
EMBEDDING_TYPE_DDL = "array<float>"
DEFAULT_BATCH_SIZE = 256

_LLM_PARAM_SQL = (
    "CREATE OR REPLACE TEMPORARY FUNCTION llm_param(params MAP<STRING, STRING>) RETURNS STRING "
    "RETURN to_json(params)"
)


def register_functions(spark) -> None:
    """Register ``llm_param``, ``llm_prompt`` and ``llm_result`` as SQL functions of ``spark``, and the task
    functions (``llm_classify``, ``llm_extract``, ``llm_summarize``, ``llm_translate``, ``llm_filter``,
    ``llm_count_tokens``, ``llm_embed``: see :mod:`.tasks`), which take the model's name as their first argument.
    The task functions reach the cluster this driver is connected to: registered before ``bls.init()`` (or a
    deploy), they say so when called; calling this again after connecting fixes that.

    Names the session already has are left as they are: registering again would only make Spark warn
    that each "replaced a previously registered function" (three lines per model function registered).

    Example:
        >>> bls.register_functions(spark)  # doctest: +SKIP
        >>> spark.sql("SELECT llm_param(map('instruction', 'hi', 'temperature', '0'))")  # doctest: +SKIP
    """
    check_python(spark)
    if not spark.catalog.functionExists("llm_param"):
        spark.sql(_LLM_PARAM_SQL)
    # llm_prompt needs a loop over the array; SQL functions with lambdas cannot be nested in
    # another SQL function (Spark 4: LAMBDA_FUNCTION_WITH_SQL_UDF), so it is an Arrow Python UDF.
    if not spark.catalog.functionExists("llm_prompt"):
        spark.udf.register("llm_prompt", _llm_prompt_udf())
    if not spark.catalog.functionExists("llm_result"):
        spark.udf.register("llm_result", _llm_result_udf())
    from .tasks import ensure_task_functions

    ensure_task_functions(spark)


def fill_prompt(template: str | None, args: list | None) -> str | None:
    """``fill_prompt('hi {0}', ['Zhu'])`` → ``'hi Zhu'``; placeholders beyond the array stay as they are."""
    if template is None:
        return None
    for i, value in enumerate(args or []):
        template = template.replace("{%d}" % i, "" if value is None else str(value))
    return template


def _llm_prompt_udf():
    from pyspark.sql.functions import udf

    check_python()
    return udf(fill_prompt, "string", useArrow=True)


def _llm_result_udf():
    from pyspark.sql.functions import udf

    check_python()

    def llm_result(value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if hasattr(value, "asDict"):
            value = value.asDict()
        if isinstance(value, Mapping):
            return value.get("response")
        raise TypeError(f"llm_result takes the text or struct a model function returns, not {type(value).__name__}")

    # useArrow given: left to infer it, Spark warns "Cannot infer the eval type from type hints".
    return udf(llm_result, "string", useArrow=False)


def llm_result(col):
    """DataFrame API: the answer text from a model function's result (text or struct)."""
    return _llm_result_udf()(col)


def llm_param(params: Mapping[str, Any]):
    """DataFrame API: ``llm_param({"instruction": F.col("q"), "temperature": 0})`` → JSON Column.

    Values may be Columns or Python literals; all become strings, as in Byzer's string maps.
    """
    from pyspark.sql import Column
    from pyspark.sql import functions as F

    if not isinstance(params, Mapping) or not params:
        raise ConfigError(bad_value("llm_param(params)", params, "pass a non-empty dict of key -> Column or value"))
    parts = []
    for key, value in params.items():
        if not isinstance(key, str):
            raise ConfigError(bad_value("llm_param key", key, "keys are strings such as 'instruction'"))
        column = value if isinstance(value, Column) else F.lit(
            json.dumps(value) if isinstance(value, (list, dict)) else None if value is None else str(value)
        )
        parts += [F.lit(key), column.cast("string")]
    return F.to_json(F.create_map(*parts))


def llm_prompt(template, args):
    """DataFrame API: fill ``{0}``, ``{1}``... of ``template`` from ``args`` (Columns/values or an array Column)."""
    from pyspark.sql import Column
    from pyspark.sql import functions as F

    array = args if isinstance(args, Column) else F.array(*[a if isinstance(a, Column) else F.lit(str(a)) for a in args])
    template_col = template if isinstance(template, Column) else F.lit(template)
    return _llm_prompt_udf()(template_col, array.cast("array<string>"))


def model_function(
    model: str,
    *,
    fail_on_error: bool = True,
    batch_size: int | None = None,
    concurrency: int | None = None,
    endpoint: str | None = None,
    timeout: float = 600.0,
    max_retries: int | None = None,
    retry_seconds: float | None = None,
    cache: Any = None,
    return_type: Any = None,
):
    """The Spark function that calls a deployed model (DataFrame API).

    Args:
        model: the deployed model's name.
        fail_on_error: True returns the answer text and fails the query on a bad row; False
            returns ``struct<response, error, metadata>`` so every row gets an answer or its error.
        batch_size: rows per HTTP request; default: what the model's backend prefers (5000 for
            the echo plugin, 16 for transformers, 4 for llama.cpp, 64 for other plugins).
        concurrency: requests in flight per Spark task (default: the model's worker slots divided by
            Spark's default parallelism, at least 2), so a small Spark cluster keeps more workers
            busy than it has cores.
        endpoint: base URL the executors use; default ``bls.endpoint()``.
        timeout: seconds per request.
        retry_seconds: how long a request keeps retrying connection errors and 5xx (with backoff)
            after its first failure; default ``$BYZERLLM_RETRY_SECONDS`` on the driver, else 60, which
            outlasts a Serve proxy restart.
        max_retries: also caps the number of retries; default None (only ``retry_seconds``).
        cache: this function's response cache, in ``deploy(cache=...)``'s forms: ``True`` (deterministic
            requests), ``"always"``, ``"redis://host:6379/0"``, or ``False`` (off, also where the deployment
            caches); default None: the deployment's setting. ``True`` and ``"always"`` use the deployment's
            store if it has one, else a folder on each worker's node. A re-run of a query that failed
            part-way, and Spark's task retries, then send upstream only the rows not answered yet.
        return_type: structured output into a typed column. A Spark DDL type (``"struct<city:string,
            year:int>"``, ``"string"``, ``"array<string>"``...), a ``pyspark.sql.types.DataType``, or a JSON
            schema (dict or JSON text; ``{"enum": [...]}`` for labels). Each row asks the model for an
            answer matching the JSON schema (``response_format``; the engine constrains its decoding to it)
            and the function returns the parsed value with that Spark type. With ``fail_on_error=False``
            the result is ``struct<response: string (the raw answer), error, metadata, value: <type>>``: a
            row that does not parse has its error and raw text, and a null value. Default None: text.

    Returns:
        An Arrow UDF taking the ``llm_param`` JSON column. Embedding models return ``array<float>``.

    Raises:
        ModelNotFoundError: the model is not deployed (lists the deployed ones).
        ConfigError: a malformed option (``cache=`` names the accepted forms); a ``return_type`` that is no
            Spark type or JSON schema this can map, or one given for an embedding model.

    Example:
        >>> chat = model_function("chat_model")  # doctest: +SKIP
        >>> df.withColumn("a", chat(llm_param({"instruction": F.col("q")})))  # doctest: +SKIP
        >>> extract = model_function("chat_model", return_type="struct<city:string, year:int>")  # doctest: +SKIP
        >>> df.select(extract(llm_param({"instruction": F.col("q")})).alias("r")).select("r.city")  # doctest: +SKIP
    """
    from pyspark.sql.functions import arrow_udf

    from .. import transport
    from .udf import run_embeddings, run_requests

    check_python()
    if cache is None:
        cache_header = None
    else:
        from ..config import CacheSpec

        spec = CacheSpec.parse(cache, "cache")
        cache_header = "off" if spec is None else spec.header()
    retry_seconds = transport.retry_seconds(retry_seconds)  # read on the driver: executors use the same
    fallback = None
    if endpoint is None:
        from ..cluster import ensure_init

        cluster_info = ensure_init()
        endpoint, fallback = cluster_info.endpoint, cluster_info.fallback_endpoint
    info = transport.get_json(transport.local_or_fallback(endpoint, fallback, model), model, "info")
    if batch_size is None:
        batch_size = int(info.get("preferred_batch_size", DEFAULT_BATCH_SIZE))
    check_int("batch_size", batch_size, 1, 256)
    if concurrency is None:
        # Enough requests in flight that all Spark tasks together fill every worker slot, and no
        # more: extra threads in a Python worker fight over the GIL for Arrow encoding (measured:
        # echo rows/s fell from ~100k to ~30k going from 2 to 8 in flight per task).
        slots = int(info.get("num_workers", 1)) * int(info.get("worker_concurrency", 1))
        concurrency = max(2, -(-slots // _spark_parallelism()))
    check_int("concurrency", concurrency, 1, 4)
    options = dict(
        model=model, endpoint=endpoint, batch_size=batch_size, concurrency=concurrency,
        timeout=timeout, max_retries=max_retries, retry_seconds=retry_seconds, fail_on_error=fail_on_error,
        stats=_stats_accumulator(),
    )
    if cache_header is not None:
        options["cache_header"] = cache_header
    if fallback is not None:
        options["fallback_endpoint"] = fallback
    if info.get("embedding"):
        if return_type is not None:
            raise ConfigError(bad_value("return_type", return_type, f"model {model!r} computes embeddings "
                                        "(array<float>): leave return_type out, or call a chat model"))

        options.pop("cache_header", None)  # embeddings are not cached

        def embed_fn(batches):
            return run_embeddings(batches, **options)

        return arrow_udf(_arrow_iterator_hints(embed_fn), EMBEDDING_TYPE_DDL)

    result_type: Any = "string" if fail_on_error else RESULT_TYPE_DDL
    if return_type is not None:
        from ._structured import parse_return_type, result_struct

        value_type, schema = parse_return_type(return_type)
        response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        options["structured"] = (json.dumps(response_format, separators=(",", ":")), value_type)
        result_type = value_type if fail_on_error else result_struct(value_type)

    def chat_fn(batches):
        return run_requests(batches, **options)

    return arrow_udf(_arrow_iterator_hints(chat_fn), result_type)


def _arrow_iterator_hints(fn):
    """Spark picks the UDF kind from real type hints: Iterator[pa.Array] -> Iterator[pa.Array]."""
    import typing

    import pyarrow as pa

    fn.__annotations__ = {"batches": typing.Iterator[pa.Array], "return": typing.Iterator[pa.Array]}
    return fn


def _spark_parallelism() -> int:
    from pyspark import SparkContext

    context = SparkContext._active_spark_context
    try:
        return max(1, int(context.defaultParallelism)) if context is not None else 1
    except Exception:  # Spark Connect has no SparkContext
        return 1


def register_model_function(spark, model: str, *, udf_name: str | None = None, **options: Any) -> str:
    """Register a deployed model as the SQL function ``udf_name`` (default: the model name).

    Takes the options of :func:`model_function` (``cache=True`` caches this function's answers, see
    there). Also registers ``llm_param`` and friends.

    Returns:
        The registered function name.

    Raises:
        ModelNotFoundError: the model is not deployed.
        ConfigError: a malformed option, named with its accepted forms.

    Example:
        >>> bls.register_model_function(spark, "chat", udf_name="chat_cached", cache=True)  # doctest: +SKIP
        'chat_cached'
        >>> bls.register_model_function(spark, "chat", udf_name="extract_place",
        ...                             return_type="struct<city:string, year:int>")  # doctest: +SKIP
        >>> spark.sql("SELECT extract_place(llm_param(map('instruction', txt))) AS r FROM t").select("r.city")  # doctest: +SKIP
    """
    name = udf_name or model
    fn = model_function(model, **options)
    register_functions(spark)
    spark.udf.register(name, fn)
    return name


# ---- What a query cost ----------------------------------------------------------------------------------

def _require_stats(spark) -> Any:
    accumulator = None if type(spark).__module__.startswith("pyspark.sql.connect") else _stats_accumulator()
    if accumulator is None:
        raise ConfigError(
            "per-query statistics need a classic SparkSession: they travel on Spark accumulators, which "
            "Spark Connect does not have. Use bls.stat(model) for the workers' running totals (rows and "
            "tokens over all callers)"
        )
    return accumulator


@dataclass(frozen=True)
class QueryStats:
    """What the model functions did for a query: rows sent (nulls included), HTTP requests, rows answered
    with an error (``fail_on_error=False``), retried requests, and the tokens the backends reported in each
    row's metadata. ``by_model`` splits them per model."""

    rows: int = 0
    requests: int = 0
    errors: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_model: Mapping[str, QueryStats] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, entries: Mapping[tuple, tuple]) -> QueryStats:
        """From accumulator entries ``{(query, model): counts}``: per model, and in total."""
        per_model: dict[str, list[int]] = {}
        for (_, model), counts in entries.items():
            totals = per_model.setdefault(model, [0] * len(counts))
            for i, count in enumerate(counts):
                totals[i] += count
        per_model = {model: counts for model, counts in sorted(per_model.items()) if any(counts)}
        return cls(*(sum(column) for column in zip(*per_model.values())),
                   by_model={model: cls(*counts) for model, counts in per_model.items()})


class track:
    """Count what the model functions do while the block runs.

    ``q`` reads as a :class:`QueryStats` (``q.rows``, ``q.prompt_tokens``, ``print(q)``): live inside the
    block, as Spark's tasks finish, and fixed at its end. Every query of this SparkContext counts, from
    any thread. A task that Spark runs again (a retry, speculation) counts again.

    Args:
        spark: the session, to refuse Spark Connect clearly; default: the active SparkContext.

    Raises:
        ConfigError: no classic SparkContext (Spark Connect has no accumulators).

    Example:
        >>> with bls.track(spark) as q:  # doctest: +SKIP
        ...     spark.sql("SELECT chat(llm_param(map('instruction', q))) FROM questions").collect()
        >>> print(q)  # doctest: +SKIP
        QueryStats(rows=1000, requests=250, errors=0, retries=0, prompt_tokens=41250, completion_tokens=18032)
    """

    def __init__(self, spark: Any = None) -> None:
        self._accumulator = _require_stats(spark)
        self._start: dict = {}
        self._final: QueryStats | None = None

    def __enter__(self) -> track:
        self._start = dict(self._accumulator.value)  # a copy: Spark merges finished tasks into the value
        return self

    def __exit__(self, *exc: Any) -> None:
        self._final = self.stats

    @property
    def stats(self) -> QueryStats:
        if self._final is not None:
            return self._final
        now = dict(self._accumulator.value)
        return QueryStats.of({
            key: tuple(a - b for a, b in zip(counts, self._start.get(key, (0,) * len(counts))))
            for key, counts in now.items()
        })

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.stats, name)

    def __repr__(self) -> str:
        return repr(self.stats)


def last_query_stats(spark: Any = None) -> QueryStats | None:
    """What the model functions did for the latest Spark SQL query (or DataFrame action) that called one,
    once its tasks are done; None before any.

    Example:
        >>> spark.sql("SELECT chat(llm_param(map('instruction', q))) FROM questions").show()  # doctest: +SKIP
        >>> bls.last_query_stats().completion_tokens  # doctest: +SKIP
        18032

    Raises:
        ConfigError: no classic SparkContext (Spark Connect has no accumulators).
    """
    entries = dict(_require_stats(spark).value)
    queries = [int(query) for query, _ in entries if query is not None]
    if not queries:
        return None
    last = str(max(queries))
    return QueryStats.of({key: counts for key, counts in entries.items() if key[0] == last})
