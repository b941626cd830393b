"""Task functions: Spark SQL and DataFrame functions for common LLM jobs on any deployed model, the way
Databricks' ``ai_classify`` / ``ai_extract`` / ``ai_summarize`` / ``ai_translate`` work.

The model's name is each function's first argument (a literal or a column), so one registration serves
every deployed model::

    SELECT llm_classify('chat', review, array('positive', 'negative', 'neutral')) AS label FROM reviews
    SELECT * FROM reviews WHERE llm_filter('chat', review, 'mentions the price')

Each task is a prompt, a ``response_format`` that constrains the answer where the answer has a shape
(labels, a JSON object, true/false: the engine decodes only what matches, see ``protocol/structured.py``),
a ``max_length`` and the parse of the answer into the function's Spark type. Embeddings go to the model's
``embed`` route and token counts to its ``tokenize`` route (the model's own tokenizer, nothing generated).

Shapes on the executors: Spark hands a task an iterator of tuples of ``pa.Array`` (model, text, argument),
one tuple per Arrow batch → cut into chunks of ``batch_size`` rows (default: the first model's preferred
batch size) → each chunk's rows become requests, one Arrow request per model in it, ``concurrency`` chunks
in flight → answers parsed to the task's type, yielded in input order. A null in any argument gives a null
result; a bad argument (an empty label list, ``max_words`` 0) is that row's error, named with its fix.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import ClusterError, ConfigError, RequestError, bad_value

#: The SQL names, in the order ``register_task_functions`` registers them.
TASK_NAMES = ("llm_classify", "llm_extract", "llm_summarize", "llm_translate", "llm_filter", "llm_count_tokens",
              "llm_embed")
#: Default concurrency of a task function: requests in flight per Spark task (model functions pick theirs
#: from the model's worker slots; a task function's model is known only on the executors).
DEFAULT_CONCURRENCY = 2
#: The most tokens a generated text may take by default (the request default of ``llm_param``).
MAX_TEXT_TOKENS = 1024


@dataclass(frozen=True)
class Task:
    """One task: its SQL name, its arguments after ``model`` and ``text``, the Spark DDL of its value, the
    route it calls (``arrow``: chat, ``embed``, ``tokenize``) and the model kind it needs."""

    name: str
    args: tuple[str, ...]
    value_ddl: str
    route: str = "arrow"

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(('model', 'text') + self.args)})"


TASKS = {
    "llm_classify": Task("llm_classify", ("labels",), "string"),
    "llm_extract": Task("llm_extract", ("fields",), "map<string,string>"),
    "llm_summarize": Task("llm_summarize", ("max_words",), "string"),
    "llm_translate": Task("llm_translate", ("to_lang",), "string"),
    "llm_filter": Task("llm_filter", ("condition",), "boolean"),
    "llm_count_tokens": Task("llm_count_tokens", (), "int", route="tokenize"),
    "llm_embed": Task("llm_embed", (), "array<float>", route="embed"),
}


# ---- the requests (pure: tested without a cluster) -------------------------------------------------------
def _response_format(schema: dict, name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def _labels(value: Any) -> list[str]:
    fix = "pass a non-empty array of distinct label strings, e.g. array('positive', 'negative')"
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(bad_value("llm_classify labels", value, fix))
    labels: list[str] = []
    for label in value:
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(bad_value("llm_classify labels", list(value), "every label is a non-empty string; " + fix))
        if label not in labels:
            labels.append(label)
    return labels


def _fields(value: Any) -> list[str]:
    fix = "pass a non-empty array of distinct field names, e.g. array('city', 'year')"
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(bad_value("llm_extract fields", value, fix))
    if not all(isinstance(f, str) and f.strip() for f in value) or len(set(value)) != len(value):
        raise ConfigError(bad_value("llm_extract fields", list(value), "field names are distinct non-empty strings; "
                                    + fix))
    return list(value)


#: The longest string value an extraction gives (characters), unless its schema says otherwise: extracted
#: values are names, dates, amounts; unbounded, a small model can run one on until ``max_length`` cuts the JSON.
EXTRACT_MAX_CHARS = 60


def fields_schema(fields: list[str]) -> dict[str, Any]:
    """The JSON schema of an extraction into string fields: every field required, no others."""
    return bound_strings({"type": "object", "properties": {f: {"type": "string"} for f in fields},
                          "required": list(fields), "additionalProperties": False})


def bound_strings(schema: Any) -> Any:
    """``schema`` with ``maxLength: EXTRACT_MAX_CHARS`` on each string without a ``maxLength`` (a copy)."""
    if isinstance(schema, list):
        return [bound_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bound_strings(v) if k in ("properties", "items", "additionalProperties", "anyOf", "oneOf") else v
           for k, v in schema.items()}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: bound_strings(v) for k, v in schema["properties"].items()}
    if out.get("type") == "string" and "maxLength" not in out and "enum" not in out:
        out["maxLength"] = EXTRACT_MAX_CHARS
    return out


def answer_tokens(schema: Any) -> int:
    """Tokens enough for any answer of ``schema`` with bounded strings (a token holds at least one character):
    the ``max_length`` of an extraction; arrays count as 4 items."""
    if not isinstance(schema, dict):
        return 8
    if isinstance(schema.get("properties"), dict):
        return 4 + sum(len(k) + 4 + answer_tokens(v) for k, v in schema["properties"].items())
    if schema.get("type") == "array":
        return 4 + 4 * answer_tokens(schema.get("items"))
    if isinstance(schema.get("additionalProperties"), dict):
        return 4 + 4 * (24 + answer_tokens(schema["additionalProperties"]))
    if "enum" in schema:
        return 4 + max((len(json.dumps(v)) for v in schema["enum"]), default=4)
    if schema.get("type") == "string":
        return 2 + int(schema.get("maxLength", EXTRACT_MAX_CHARS))
    return 24  # a number or boolean


def _max_words(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ConfigError(bad_value("llm_summarize max_words", value, "pass a whole number of words >= 1, e.g. 50"))
    return int(value)


def _words_tokens(words: int) -> int:
    """Tokens to generate for ``words`` words: English runs about 1.3 tokens a word; room for punctuation."""
    return 2 * words + 16


def build_request(task: str, text: str, arg: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The chat request of one row of a task: instruction, system message, ``response_format`` and
    ``max_length`` (``options["max_length"]`` overrides the task's default), ``temperature``.

    Raises:
        ConfigError: the row's argument is not valid (names the parameter, the value and the fix).

    Example:
        >>> build_request("llm_filter", "I paid 5 euros", "mentions a price", {})["response_format"]
        {'type': 'json_schema', 'json_schema': {'name': 'verdict', 'schema': {'type': 'boolean'}}}
    """
    if task == "llm_classify":
        labels = _labels(arg)
        request = {
            "system_msg": "You classify texts. Answer with the one label that fits the text best.",
            "instruction": f"Labels: {', '.join(labels)}\n\nText: {text}",
            "response_format": _response_format({"enum": labels}, "label"),
            # a label is at most one token per UTF-8 byte, with its quotes
            "max_length": 4 + max(len(label.encode("utf-8")) for label in labels),
        }
    elif task == "llm_extract":
        schema = options.get("schema")
        if schema is None:
            fields = _fields(arg)
            schema = fields_schema(fields)
        else:
            fields = list(schema.get("properties", {}))
        request = {
            "system_msg": "You extract information from texts. Answer with JSON only: the requested fields, "
                          "with values taken from the text.",
            "instruction": f"Fields: {', '.join(fields)}\n\nText: {text}",
            "response_format": _response_format(schema, "extraction"),
            "max_length": answer_tokens(schema),
        }
    elif task == "llm_summarize":
        words = _max_words(arg)
        request = {
            "system_msg": f"You summarize texts. Answer with the summary only, in at most {words} words.",
            "instruction": text,
            "max_length": _words_tokens(words),
        }
    elif task == "llm_translate":
        if not isinstance(arg, str) or not arg.strip():
            raise ConfigError(bad_value("llm_translate to_lang", arg, "name the target language, e.g. 'French'"))
        request = {
            "system_msg": f"You translate texts into {arg}. Answer with the translation only.",
            "instruction": text,
            # a translation is about as long as its text; a token covers at least a character or two
            "max_length": min(MAX_TEXT_TOKENS, 16 + 2 * len(text)),
        }
    elif task == "llm_filter":
        if not isinstance(arg, str) or not arg.strip():
            raise ConfigError(bad_value("llm_filter condition", arg, "state the condition in words, e.g. "
                                        "'mentions a price'"))
        request = {
            "system_msg": "You check whether a condition holds for a text. Answer true or false.",
            "instruction": f"Condition: {arg}\n\nText: {text}\n\nDoes the condition hold for the text?",
            "response_format": _response_format({"type": "boolean"}, "verdict"),
            "max_length": 4,
        }
    else:
        raise ConfigError(bad_value("task", task, f"use one of {', '.join(TASKS)}"))
    request["temperature"] = options.get("temperature", 0.0)
    if options.get("max_length") is not None:
        request["max_length"] = options["max_length"]
    return request


def cut_words(text: str, max_words: int) -> str:
    """``text`` cut after its ``max_words``-th word (runs of non-space characters), spacing kept.

    Example:
        >>> cut_words("one two  three four", 3)
        'one two  three'
    """
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text if len(ends) <= max_words else text[:ends[max_words - 1]]


# ---- the executor side ------------------------------------------------------------------------------------
def kind_error(task: Task, model: str, info: dict[str, Any]) -> str | None:
    """Why ``model`` (its ``info``) cannot do ``task``, naming what to use instead; None when it can."""
    backend = info.get("backend", "?")
    if task.route == "embed" and not info.get("embedding"):
        return (f"{task.name} cannot use model {model!r}: it is a chat model ({backend}), which computes no "
                "embeddings. Deploy an embedding model (bls.deploy(name, infer_backend='embedding'), or a saas "
                f"model with saas.embedding=true) and pass its name; with {model!r} use llm_classify, llm_extract, "
                "llm_summarize, llm_translate or llm_filter")
    if task.route == "arrow" and info.get("embedding"):
        return (f"{task.name} cannot use model {model!r}: it is an embedding model ({backend}), which computes "
                f"vectors, not answers. Pass a chat model (e.g. one deployed with infer_backend='llama_cpp' or "
                f"'transformers'); with {model!r} use llm_embed(model, text) or llm_count_tokens(model, text)")
    return None


def run_task(batches, *, task: Task, value_type, fail_on_error: bool, endpoint: str | None, options: dict,
             batch_size: int | None, concurrency: int, timeout: float, max_retries: int | None,
             retry_seconds: float | None, stats=None, fallback_endpoint: str | None = None):
    """The Arrow iterator of a task function (see the module docstring for the shapes). ``value_type``: the
    Spark type of the value; ``options``: ``max_length``, ``temperature``, ``schema`` (a typed extraction)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyspark.sql.pandas.types import to_arrow_type

    from .. import transport
    from ..protocol import arrow
    from ._structured import typed_values
    from .udf import token_usage, windowed

    if endpoint is None:
        raise ClusterError(f"{task.name} was registered before this driver was connected to Byzer-LLM's cluster: "
                           "call bls.init() (or bls.deploy(...)) first, then bls.register_functions(spark) again")
    endpoint = transport.local_or_fallback(endpoint, fallback_endpoint)
    arrow_type = to_arrow_type(value_type)
    infos: dict[str, dict] = {}
    totals: dict[str, list[int]] = {}

    def info(model: str) -> dict:
        if model not in infos:  # once per Spark task: a model redeployed under the same name is seen anew
            infos[model] = transport.get_json(endpoint, model, "info")
            why = kind_error(task, model, infos[model])
            if why:
                raise ConfigError(why)
        return infos[model]

    def tables():
        size = batch_size
        for cols in batches:
            cols = cols if isinstance(cols, (tuple, list)) else (cols,)
            if len(cols) != 2 + len(task.args) and not (len(cols) == 2 and "schema" in options):
                raise ConfigError(f"{task.name} takes {2 + len(task.args)} arguments, {task.signature}; it was "
                                  f"called with {len(cols)}")
            table = pa.table({f"a{i}": c for i, c in enumerate(cols)})
            if size is None and len(table):
                models = [m for m in table.column(0).to_pylist() if m is not None]
                size = int(info(str(models[0])).get("preferred_batch_size", 16)) if models else None
            step = size or 16
            for offset in range(0, len(table), step):
                yield table.slice(offset, step)

    def texts_of(column) -> list:
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            column = pc.cast(column, pa.string())
        return column.to_pylist()

    def submit(chunk):
        n = len(chunk)
        models = chunk.column(0).to_pylist()
        texts = texts_of(chunk.column(1))
        has_arg = chunk.num_columns > 2
        extra = chunk.column(2).to_pylist() if has_arg else [None] * n
        responses: list = [None] * n
        errors: list = [None] * n
        metadata: list = [None] * n
        values: list = [None] * n
        groups: dict[str, list[tuple[int, str]]] = {}
        for i in range(n):
            if models[i] is None or texts[i] is None or (has_arg and extra[i] is None):
                continue  # null in, null out
            if task.route == "arrow":
                try:
                    row = json.dumps(build_request(task.name, texts[i], extra[i], options), ensure_ascii=False)
                except ConfigError as exc:
                    if fail_on_error:
                        raise
                    errors[i] = str(exc)
                    continue
            else:
                row = json.dumps({"instruction": texts[i]}, ensure_ascii=False)
            groups.setdefault(str(models[i]), []).append((i, row))
        counts: dict[str, tuple] = {}
        for model, rows in groups.items():
            info(model)
            body = arrow.encode_params([r for _, r in rows])
            try:
                table = arrow.decode_results(transport.post_arrow(
                    endpoint, model, body, route=task.route, timeout=timeout, max_retries=max_retries,
                    retry_seconds=retry_seconds))
            except RequestError as exc:
                if fail_on_error or isinstance(exc, transport.ModelNotFoundError):
                    raise
                for i, _ in rows:
                    errors[i] = str(exc)
                counts[model] = (len(rows), 1, len(rows), transport.last_retries(), 0, 0)
                continue
            got_errors = table.column("error").to_pylist()
            column = {"arrow": "response", "embed": "embedding", "tokenize": "tokens"}[task.route]
            got = table.column(column).to_pylist()
            got_meta = table.column("metadata").to_pylist() if "metadata" in table.column_names else [None] * len(rows)
            for (i, _), answer, error, meta in zip(rows, got, got_errors, got_meta):
                errors[i] = error
                metadata[i] = meta
                if task.route == "arrow":
                    responses[i] = answer
                elif error is None:
                    values[i] = answer
            usage = token_usage(table.column("metadata")) if "metadata" in table.column_names else (0, 0)
            counts[model] = (len(rows), 1, sum(1 for e in got_errors if e), transport.last_retries(), *usage)
        if task.route == "arrow":
            answers = [None if errors[i] else responses[i] for i in range(n)]
            if task.name in ("llm_summarize", "llm_translate"):
                values = [None if a is None else a.strip() for a in answers]
                if task.name == "llm_summarize":
                    values = [None if v is None else cut_words(v, _max_words(extra[i])) for i, v in enumerate(values)]
                value_array, bad = pa.array(values, arrow_type), [None] * n
            else:  # a JSON answer, checked against its schema by the worker
                value_array, bad = typed_values(answers, arrow_type)
            errors = [e or b for e, b in zip(errors, bad)]
        else:
            value_array = pa.array(values, arrow_type)
        first = next((i for i, e in enumerate(errors) if e), None)
        if fail_on_error and first is not None:
            raise RequestError(
                f"{task.name}: model {models[first]!r} could not answer a row ({errors[first]}); text: "
                f"{str(texts[first])[:200]!r}. For per-row errors instead of a failed query, call it with "
                "fail_on_error=False (bls.register_task_functions(spark, fail_on_error=False) in SQL)")
        if fail_on_error:
            return value_array, counts
        fields = [pa.array(responses, pa.string()), pa.array(errors, pa.string()),
                  pa.array(metadata, arrow.METADATA_TYPE), value_array]
        mask = pa.array([r is None and e is None and m is None for r, e, m in zip(responses, errors, metadata)])
        return pa.StructArray.from_arrays(fields, names=["response", "error", "metadata", "value"], mask=mask), counts

    try:
        for array, counts in windowed(tables(), submit, concurrency, sys.maxsize):
            for model, c in counts.items():
                total = totals.setdefault(model, [0] * len(c))
                for k, v in enumerate(c):
                    total[k] += v
            yield array
    finally:
        if stats is not None and totals:
            from pyspark import TaskContext

            context = TaskContext.get()
            query = context.getLocalProperty("spark.sql.execution.id") if context is not None else None
            stats.add({(query, model): tuple(c) for model, c in totals.items()})


# ---- the driver side --------------------------------------------------------------------------------------
def _value_type(task: Task, return_type: Any, fields: list[str] | None) -> tuple[Any, dict | None]:
    """``(Spark type of the value, JSON schema fixed for every row or None)``."""
    from pyspark.sql import types as T

    if task.name == "llm_extract" and return_type is not None:
        from ._structured import parse_return_type

        dt, schema = parse_return_type(return_type)
        if not isinstance(dt, T.StructType):
            raise ConfigError(bad_value("return_type", return_type, "llm_extract returns a struct: pass a struct "
                                        "type such as 'struct<city:string, year:int>'"))
        return dt, bound_strings(schema)
    if task.name == "llm_extract" and fields is not None:
        fields = _fields(fields)
        return T.StructType([T.StructField(f, T.StringType()) for f in fields]), fields_schema(fields)
    if return_type is not None:
        raise ConfigError(bad_value("return_type", return_type, f"only llm_extract takes a return_type; "
                                    f"{task.name} returns {task.value_ddl}"))
    return _ddl(task.value_ddl), None


def _ddl(ddl: str):
    from pyspark.sql import types as T

    simple = {"string": T.StringType(), "boolean": T.BooleanType(), "int": T.IntegerType(),
              "array<float>": T.ArrayType(T.FloatType()),
              "map<string,string>": T.MapType(T.StringType(), T.StringType())}
    return simple[ddl]


def task_udf(name: str, *, fail_on_error: bool = True, return_type: Any = None, fields: list[str] | None = None,
             endpoint: str | None = None, batch_size: int | None = None, concurrency: int | None = None,
             timeout: float = 600.0, max_retries: int | None = None, retry_seconds: float | None = None,
             max_length: int | None = None, temperature: float = 0.0, connect: bool = True):
    """The Arrow UDF of task ``name`` (one of :data:`TASK_NAMES`), taking ``(model, text[, argument])``.

    ``connect=False`` (``register_functions``): a driver not yet connected gets a function that says so
    when it runs, instead of starting a cluster here.

    Raises:
        ConfigError: an unknown task or a malformed option (named, with its accepted forms).
    """
    from pyspark.sql.functions import arrow_udf

    from .. import transport
    from ..errors import check_int
    from ._structured import result_struct
    from ._driver import _stats_accumulator, check_python

    task = TASKS.get(name)
    if task is None:
        raise ConfigError(bad_value("task", name, f"use one of {', '.join(TASK_NAMES)}"))
    check_python()
    if batch_size is not None:
        check_int("batch_size", batch_size, 1, 256)
    concurrency = DEFAULT_CONCURRENCY if concurrency is None else concurrency
    check_int("concurrency", concurrency, 1, 4)
    if max_length is not None:
        check_int("max_length", max_length, 1, 1 << 20)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ConfigError(bad_value("temperature", temperature, "pass a number from 0 to 2 (default 0)"))
    value_type, schema = _value_type(task, return_type, fields)
    fallback = None
    if endpoint is None:
        from .. import cluster

        if connect or cluster.is_connected():
            info = cluster.ensure_init()
            endpoint, fallback = info.endpoint, info.fallback_endpoint
    options: dict[str, Any] = {"temperature": float(temperature)}
    if max_length is not None:
        options["max_length"] = max_length
    if schema is not None:
        options["schema"] = schema
    run = dict(task=task, value_type=value_type, fail_on_error=fail_on_error, endpoint=endpoint, options=options,
               batch_size=batch_size, concurrency=concurrency, timeout=timeout, max_retries=max_retries,
               retry_seconds=transport.retry_seconds(retry_seconds), stats=_stats_accumulator(),
               fallback_endpoint=fallback)

    def task_fn(batches):
        return run_task(batches, **run)

    import typing

    import pyarrow as pa

    task_fn.__name__ = name
    task_fn.__annotations__ = {"batches": typing.Iterator[typing.Tuple[pa.Array, ...]],
                               "return": typing.Iterator[pa.Array]}
    return arrow_udf(task_fn, value_type if fail_on_error else result_struct(value_type))


def check_model(name: str, model: str, endpoint: str | None = None) -> None:
    """On the driver, for a model given by name: it is deployed and can do the task.

    Raises:
        ModelNotFoundError: not deployed (lists the deployed ones).
        ConfigError: the wrong kind of model for the task, naming what to use instead.
    """
    from .. import transport

    if endpoint is None:
        from ..cluster import endpoint as cluster_endpoint

        endpoint = cluster_endpoint()
    why = kind_error(TASKS[name], model, transport.get_json(endpoint, model, "info"))
    if why:
        raise ConfigError(why)


_OPTION_DOC = """
    Options (keyword): ``fail_on_error`` (default True: a row the model cannot answer fails the query;
    False: ``struct<response, error, metadata, value>``, as a model function with a ``return_type``),
    ``batch_size`` (rows per request; default the model's preferred), ``concurrency`` (requests in flight per
    Spark task, default 2), ``endpoint``, ``timeout`` (s), ``max_retries``, ``retry_seconds``, and for the
    generating tasks ``max_length`` (tokens; default per task) and ``temperature`` (default 0).

"""


def _with_options(fn):
    fn.__doc__ = fn.__doc__.replace("    {options}\n", _OPTION_DOC)
    return fn


def _column(value: Any, literal: bool):
    """A Column: Columns as they are; a str is a column name unless ``literal``; other values are literals."""
    from pyspark.sql import Column
    from pyspark.sql import functions as F

    if isinstance(value, Column):
        return value
    if isinstance(value, str) and not literal:
        return F.col(value)
    if isinstance(value, (list, tuple)):
        return F.array(*[F.lit(v) for v in value]) if value else F.array().cast("array<string>")
    return F.lit(value)


def _call(name: str, model: Any, text: Any, arg: Any = None, *, udf_options: dict) -> Any:
    from pyspark.sql import Column

    if not isinstance(model, (str, Column)):
        raise ConfigError(bad_value(f"{name} model", model, "pass the deployed model's name (a str) or a Column"))
    if isinstance(model, str):
        check_model(name, model, udf_options.get("endpoint"))
    fn = task_udf(name, **udf_options)
    columns = [_column(model, literal=True), _column(text, literal=False)]
    if arg is not None:
        columns.append(_column(arg, literal=True))
    return fn(*columns).alias(name)


# ---- the public functions ---------------------------------------------------------------------------------
@_with_options
def llm_classify(model: Any, text: Any, labels: Any, **options: Any):
    """DataFrame API: the label of ``labels`` that fits ``text`` best; always one of them (the model's decoding is
    constrained to the labels, as a JSON ``enum``). Databricks calls this ``ai_classify``.

    Args:
        model: the deployed chat model's name, or a Column of names.
        text: a Column, or a column name.
        labels: a list of label strings, or an ``array<string>`` Column.
    {options}
    Returns:
        A ``string`` Column.

    Raises:
        ModelNotFoundError: ``model`` is not deployed. ConfigError: ``model`` is an embedding model, or
        ``labels`` is empty (a row whose labels are empty or hold a null fails, or gets that error).

    Example:
        >>> df.select(llm_classify("chat", "review", ["positive", "negative", "neutral"]))  # doctest: +SKIP
    """
    if isinstance(labels, str):
        raise ConfigError(bad_value("llm_classify labels", labels, "pass a list of labels, e.g. ['positive', "
                                    "'negative'], or a Column of label arrays (F.col(...))"))
    if isinstance(labels, (list, tuple)):
        _labels(labels)
    return _call("llm_classify", model, text, labels, udf_options=options)


@_with_options
def llm_extract(model: Any, text: Any, fields: Any = None, *, return_type: Any = None, **options: Any):
    """DataFrame API: named values taken from ``text`` (Databricks' ``ai_extract``). The answer is a JSON object
    that the model's decoding is constrained to; the worker checks it against the schema. Each string value is
    at most ``EXTRACT_MAX_CHARS`` (60) characters unless the schema gives its own ``maxLength`` (unbounded, a
    small model can run a value on until ``max_length`` cuts the JSON); ``max_length`` defaults to enough tokens
    for any answer of the schema.

    Args:
        model: the deployed chat model's name, or a Column of names.
        text: a Column, or a column name.
        fields: a list of field names → ``struct<field: string, ...>``; or an ``array<string>`` Column →
            ``map<string, string>`` (the SQL form's type: its fields are known only per row).
        return_type: instead of ``fields``, a struct type → a typed struct: a Spark DDL string
            (``"struct<city:string, year:int>"``), a ``StructType``, or a JSON schema of an object.
    {options}
    Returns:
        A struct (or map) Column.

    Raises:
        ConfigError: neither or both of ``fields`` and ``return_type``; a return type that is no struct; an
        embedding model. ModelNotFoundError: ``model`` is not deployed.

    Example:
        >>> df.select(llm_extract("chat", "txt", ["city", "year"]).alias("r")).select("r.city")  # doctest: +SKIP
        >>> df.select(llm_extract("chat", "txt", return_type="struct<city:string, year:int>"))  # doctest: +SKIP
    """
    from pyspark.sql import Column

    if (fields is None) == (return_type is None):
        raise ConfigError(bad_value("llm_extract fields", fields, "pass the fields (a list, or an array Column) or "
                                    "return_type='struct<...>', one of them"))
    if return_type is not None:
        return _call("llm_extract", model, text, udf_options={**options, "return_type": return_type})
    if isinstance(fields, Column):
        return _call("llm_extract", model, text, fields, udf_options=options)
    if not isinstance(fields, (list, tuple)):
        raise ConfigError(bad_value("llm_extract fields", fields, "pass a list of field names, or an array Column"))
    return _call("llm_extract", model, text, udf_options={**options, "fields": list(fields)})


@_with_options
def llm_summarize(model: Any, text: Any, max_words: Any = 50, **options: Any):
    """DataFrame API: a summary of ``text`` in at most ``max_words`` words (Databricks' ``ai_summarize``).

    The model is asked for at most ``max_words`` words and may generate about ``2 * max_words + 16`` tokens;
    a longer answer is then cut after its ``max_words``-th word (words: runs of non-space characters), so the
    limit always holds, though a cut summary may end mid-sentence.

    Args:
        model: the deployed chat model's name, or a Column of names.
        text: a Column, or a column name.
        max_words: a whole number >= 1 (default 50), or an integer Column.
    {options}
    Returns:
        A ``string`` Column.

    Example:
        >>> df.select(llm_summarize("chat", "article", 30))  # doctest: +SKIP
    """
    if not hasattr(max_words, "_jc"):
        _max_words(max_words)
    return _call("llm_summarize", model, text, max_words, udf_options=options)


@_with_options
def llm_translate(model: Any, text: Any, to_lang: Any, **options: Any):
    """DataFrame API: ``text`` translated into ``to_lang`` (a language's name, e.g. ``"French"``; Databricks'
    ``ai_translate``). At most ``16 + 2 * len(text)`` tokens are generated (1024 at most) unless ``max_length=``.

    Args:
        model: the deployed chat model's name, or a Column of names.
        text: a Column, or a column name.
        to_lang: the target language (a str is the value, not a column name), or a Column.
    {options}
    Returns:
        A ``string`` Column.

    Example:
        >>> df.select(llm_translate("chat", "comment", "German"))  # doctest: +SKIP
    """
    return _call("llm_translate", model, text, to_lang, udf_options=options)


@_with_options
def llm_filter(model: Any, text: Any, condition: Any, **options: Any):
    """DataFrame API: whether ``condition`` (in words) holds for ``text``: a boolean, the model's decoding
    constrained to ``true`` or ``false``; use it in ``filter`` / ``WHERE``.

    Args:
        model: the deployed chat model's name, or a Column of names.
        text: a Column, or a column name.
        condition: the condition in words (a str is the value, not a column name), or a Column.
    {options}
    Returns:
        A ``boolean`` Column.

    Example:
        >>> df.filter(llm_filter("chat", "review", "complains about delivery"))  # doctest: +SKIP
    """
    return _call("llm_filter", model, text, condition, udf_options=options)


def llm_count_tokens(model: Any, text: Any, **options: Any):
    """DataFrame API: the tokens of ``text`` with the model's own tokenizer (the text alone: a request adds its
    chat template's few tokens), counted by the model's workers without generating: an estimate of a run's
    cost before the run. Transformers, llama.cpp and embedding models count with their tokenizer; ``saas/*``
    models with tiktoken where it is installed and knows the model; others give an error saying so.

    Args:
        model: the deployed model's name, or a Column of names.
        text: a Column, or a column name.

    Returns:
        An ``int`` Column.

    Example:
        >>> df.select(F.sum(llm_count_tokens("chat", "prompt")))  # doctest: +SKIP
    """
    return _call("llm_count_tokens", model, text, udf_options=options)


def llm_embed(model: Any, text: Any, **options: Any):
    """DataFrame API: the embedding of ``text`` by an embedding model (``infer_backend='embedding'``, or a
    ``saas/*`` model with ``saas.embedding=true``), an ``array<float>`` of the model's dimension.

    Args:
        model: the deployed embedding model's name, or a Column of names.
        text: a Column, or a column name.

    Returns:
        An ``array<float>`` Column.

    Raises:
        ConfigError: ``model`` is a chat model (the message names what to deploy instead).

    Example:
        >>> df.select(llm_embed("minilm", "txt"))  # doctest: +SKIP
    """
    return _call("llm_embed", model, text, udf_options=options)


#: Per SparkSession: the endpoint its task functions were registered with (None: before this driver connected
#: to a cluster) and the options they were registered with.
_registered: dict[int, tuple[str | None, dict]] = {}


def _current_endpoint() -> str | None:
    from .. import cluster

    return cluster.info().endpoint if cluster.is_connected() else None


def ensure_task_functions(spark) -> None:
    """Register the task functions where the session lacks them, or has them from before this driver
    connected to a cluster (they could not reach a model then: registered again, with the same options);
    otherwise leave them, so Spark does not warn of functions replaced."""
    endpoint, options = _registered.get(id(spark), (None, {}))
    if id(spark) in _registered and (options.get("endpoint") or endpoint == _current_endpoint()) and all(
            spark.catalog.functionExists(n) for n in TASK_NAMES):
        return
    register_task_functions(spark, **options)


def register_task_functions(spark, *, fail_on_error: bool = True, replace: bool = True, **options: Any) -> list[str]:
    """Register the task functions for SQL: ``llm_classify(model, text, labels)`` → string,
    ``llm_extract(model, text, fields)`` → ``map<string,string>``, ``llm_summarize(model, text, max_words)`` →
    string, ``llm_translate(model, text, to_lang)`` → string, ``llm_filter(model, text, condition)`` → boolean,
    ``llm_count_tokens(model, text)`` → int, ``llm_embed(model, text)`` → ``array<float>``.

    ``bls.register_functions(spark)`` calls this with the defaults. A SQL function's type is fixed when it is
    registered, so ``llm_extract`` returns a map in SQL; :func:`register_extract_function` registers a typed
    struct extraction under a name of your choice.

    Args:
        spark: the SparkSession.
        fail_on_error: False registers them returning ``struct<response, error, metadata, value>``.
        replace: False leaves functions this session already has.
        options: ``batch_size``, ``concurrency``, ``endpoint``, ``timeout``, ``max_retries``,
            ``retry_seconds``, ``temperature`` (as for the DataFrame forms).

    Returns:
        The registered names.

    Example:
        >>> bls.register_task_functions(spark, fail_on_error=False)  # doctest: +SKIP
        >>> spark.sql("SELECT llm_classify('chat', txt, array('a', 'b')).error FROM t")  # doctest: +SKIP
    """
    names = []
    for name in TASK_NAMES:
        if replace or not spark.catalog.functionExists(name):
            spark.udf.register(name, task_udf(name, fail_on_error=fail_on_error, connect=False, **options))
            names.append(name)
    _registered[id(spark)] = (_current_endpoint(), {"fail_on_error": fail_on_error, **options})
    return names


def register_extract_function(spark, name: str, return_type: Any, **options: Any) -> str:
    """Register ``name(model, text)`` for SQL: an extraction into the typed struct ``return_type`` (a Spark DDL
    string such as ``"struct<city:string, year:int>"``, a ``StructType`` or a JSON schema of an object).

    Takes the options of :func:`llm_extract` (``fail_on_error``, ``batch_size``, ``max_length``...).

    Returns:
        The registered name.

    Raises:
        ConfigError: ``return_type`` is no struct type or has a field type with no JSON form.

    Example:
        >>> bls.register_extract_function(spark, "extract_place", "struct<city:string, year:int>")  # doctest: +SKIP
        >>> spark.sql("SELECT extract_place('chat', txt).city FROM t")  # doctest: +SKIP
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(bad_value("name", name, "pass a SQL function name such as 'extract_place'"))
    spark.udf.register(name, task_udf("llm_extract", return_type=return_type, **options))
    return name

