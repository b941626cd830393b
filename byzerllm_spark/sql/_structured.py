"""Typed model functions: a ``return_type`` (Spark DDL or JSON schema) ↔ the JSON schema the model answers to.

Shapes: on the driver, ``struct<city:string, year:int>`` → a Spark type and the JSON schema
``{"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer", ...}},
"required": [...], "additionalProperties": false}``; a JSON schema → the Spark type it maps to. On the
executors, each request row gets the ``response_format`` of that schema, and each answer (JSON text,
checked against the schema by the worker) becomes a value of the Arrow type of the Spark type.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ConfigError, bad_value

_INT_BOUNDS = {
    "byte": (-(2 ** 7), 2 ** 7 - 1), "short": (-(2 ** 15), 2 ** 15 - 1),
    "integer": (-(2 ** 31), 2 ** 31 - 1), "long": (-(2 ** 63), 2 ** 63 - 1),
}
_FIX = ("use a Spark DDL type such as 'struct<city:string, year:int>' (string, int, bigint, double, boolean, "
        "array<...>, map<string,...>, struct<...>) or a JSON schema such as "
        '\'{"type": "object", "properties": {"label": {"enum": ["positive", "negative"]}}}\'')


def spark_to_schema(dt: Any, where: str = "return_type") -> dict[str, Any]:
    """The JSON schema of answers of Spark type ``dt``: every struct field required, no other keys, integers
    bounded to their Spark type (so each answer fits the column).

    Raises:
        ConfigError: a type with no JSON form here (dates, binary...), naming the field.
    """
    from pyspark.sql import types as T

    if isinstance(dt, T.StructType):
        if not dt.fields:
            raise ConfigError(bad_value(where, dt.simpleString(), "give the struct at least one field"))
        return {
            "type": "object",
            "properties": {f.name: spark_to_schema(f.dataType, f"{where}.{f.name}") for f in dt.fields},
            "required": [f.name for f in dt.fields],
            "additionalProperties": False,
        }
    if isinstance(dt, T.ArrayType):
        return {"type": "array", "items": spark_to_schema(dt.elementType, f"{where}[]")}
    if isinstance(dt, T.MapType) and isinstance(dt.keyType, T.StringType):
        return {"type": "object", "additionalProperties": spark_to_schema(dt.valueType, f"{where}{{}}")}
    if isinstance(dt, (T.StringType, T.VarcharType, T.CharType)):
        return {"type": "string"}
    if isinstance(dt, T.BooleanType):
        return {"type": "boolean"}
    if isinstance(dt, (T.ByteType, T.ShortType, T.IntegerType, T.LongType)):
        low, high = _INT_BOUNDS[dt.typeName()]
        return {"type": "integer", "minimum": low, "maximum": high}
    if isinstance(dt, (T.FloatType, T.DoubleType)):
        return {"type": "number"}
    raise ConfigError(bad_value(where, dt.simpleString(), "this type has no JSON form here: " + _FIX))


def schema_to_spark(schema: Any, where: str = "return_type") -> Any:
    """The Spark type that answers of JSON schema ``schema`` fill (object → struct, enum → string...).

    Raises:
        ConfigError: a schema part with no Spark type here (``anyOf``, ``$ref``...), naming where.
    """
    from pyspark.sql import types as T

    if not isinstance(schema, dict):
        raise ConfigError(bad_value(where, schema, _FIX))
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        if values and all(isinstance(v, str) for v in values):
            return T.StringType()
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return T.LongType()
        raise ConfigError(bad_value(f"{where}.enum", values, "use labels of one kind: all strings or all integers"))
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties")
        if isinstance(properties, dict) and properties:
            return T.StructType([T.StructField(name, schema_to_spark(sub, f"{where}.{name}"))
                                 for name, sub in properties.items()])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return T.MapType(T.StringType(), schema_to_spark(extra, f"{where}{{}}"))
        raise ConfigError(bad_value(where, schema, "give the object 'properties' (or 'additionalProperties' with "
                                    "a schema, for a map)"))
    if kind == "array" and isinstance(schema.get("items"), dict):
        return T.ArrayType(schema_to_spark(schema["items"], f"{where}[]"))
    simple = {"string": T.StringType(), "integer": T.LongType(), "number": T.DoubleType(),
              "boolean": T.BooleanType()}
    if kind in simple:
        return simple[kind]
    raise ConfigError(bad_value(where, schema, "this schema has no Spark type here: " + _FIX))


def parse_return_type(return_type: Any) -> tuple[Any, dict[str, Any]]:
    """``(spark_type, json_schema)`` of a model function's ``return_type``: a Spark DDL string, a
    ``pyspark.sql.types.DataType``, a JSON schema (dict or its JSON text), or a full ``response_format``.

    Raises:
        ConfigError: the type or schema is malformed or has no counterpart; names ``return_type`` and the fix.

    Example:
        >>> parse_return_type("struct<label:string>")[1]["properties"]  # doctest: +SKIP
        {'label': {'type': 'string'}}
    """
    from pyspark.sql import types as T

    from ..errors import RequestParseError
    from ..protocol.structured import check_schema

    if isinstance(return_type, T.DataType):
        return return_type, spark_to_schema(return_type)
    if isinstance(return_type, str) and not return_type.lstrip().startswith("{"):
        try:
            dt = T.DataType.fromDDL(return_type)
        except Exception as exc:
            if "SESSION_OR_CONTEXT_NOT_EXISTS" in str(exc):
                raise ConfigError(f"return_type={return_type!r} is a Spark DDL string, which needs a SparkSession "
                                  "to parse: create the session first, or pass a pyspark.sql.types.DataType "
                                  "or a JSON schema") from None
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConfigError(bad_value("return_type", return_type, f"it is not a Spark DDL type ({first}); "
                                        + _FIX)) from None
        return dt, spark_to_schema(dt)
    schema = return_type
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ConfigError(bad_value("return_type", return_type[:200], f"it is not JSON ({exc}); " + _FIX)) from None
    if isinstance(schema, dict) and schema.get("type") == "json_schema" and isinstance(schema.get("json_schema"), dict):
        schema = schema["json_schema"].get("schema")  # a whole response_format
    try:
        check_schema(schema, "return_type")
    except RequestParseError as exc:
        raise ConfigError(str(exc)) from None
    return schema_to_spark(schema), schema


def add_response_format(array, response_format: str):
    """Request rows (JSON objects as text) with ``"response_format": <response_format>`` as their last key,
    so the declared type wins over one given in ``llm_param``. Null rows stay null."""
    import pyarrow as pa

    out = []
    for row in array.to_pylist():
        if row is None:
            out.append(None)
            continue
        head = row.rstrip()[:-1].rstrip()  # the object without its closing brace
        out.append(f'{head}{"" if head.endswith("{") else ","}"response_format":{response_format}}}')
    return pa.array(out, pa.string())


def typed_values(texts: list, arrow_type) -> tuple[Any, list]:
    """``(array of arrow_type, errors)`` from the answers' JSON texts: a row that does not convert is null,
    its error in ``errors`` (None elsewhere)."""
    import pyarrow as pa

    values: list = []
    errors: list = [None] * len(texts)
    for i, text in enumerate(texts):
        if text is None:
            values.append(None)
            continue
        try:
            values.append(json.loads(text))
        except ValueError as exc:
            values.append(None)
            errors[i] = f"the answer is not JSON ({exc})"
    try:
        return pa.array(values, arrow_type), errors
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError):
        pass
    kept = []
    for i, value in enumerate(values):  # one row spoils the batch: find it and keep the others
        try:
            pa.array([value], arrow_type)
            kept.append(value)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, TypeError) as exc:
            kept.append(None)
            errors[i] = f"the answer does not fit {arrow_type} ({str(exc)[:200]})"
    return pa.array(kept, arrow_type), errors


def result_struct(value_type):
    """The ``fail_on_error=False`` result of a typed model function: the raw answer, its error, its metadata,
    and the parsed value."""
    from pyspark.sql import types as T

    return T.StructType([
        T.StructField("response", T.StringType()), T.StructField("error", T.StringType()),
        T.StructField("metadata", T.MapType(T.StringType(), T.StringType())), T.StructField("value", value_type),
    ])
