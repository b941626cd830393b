"""Structured output: a request's ``response_format``, in OpenAI's shape, and the check of an answer.

Accepted ``response_format`` values (a dict, or its JSON text as a Spark map carries it):

- ``{"type": "text"}``: plain text (the same as no ``response_format``);
- ``{"type": "json_object"}``: any JSON object; llama.cpp's ``{"type": "json_object", "schema": {...}}``
  is taken as a JSON schema;
- ``{"type": "json_schema", "json_schema": {"name": "...", "schema": {...}, "strict": true}}``: OpenAI's
  structured outputs (LangChain's ``with_structured_output(method="json_schema")`` sends this too). A
  schema ``{"enum": ["positive", "negative"]}`` makes the answer one of the labels, as a JSON string.

Every built-in engine constrains its decoding to the schema; whatever engine answered, the worker
checks the answer against it (:meth:`ResponseFormat.check`), so a row that does not parse gets an error
and its raw text, never a wrong value. Parsed formats and compiled validators are cached per schema:
a Spark batch repeats one schema on every row.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import RequestParseError, bad_value

PARAM = "response_format"
_FIX = ('use {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": "answer", '
        '"schema": {"type": "object", "properties": {...}}}}')
#: The schema of ``{"type": "json_object"}``: any object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ResponseFormat:
    """A parsed ``response_format``: ``kind`` is ``json_object`` or ``json_schema``; ``schema`` the JSON
    schema the answer must match (``{"type": "object"}`` for a plain ``json_object``)."""

    kind: str
    schema: dict = field(hash=False, compare=False)
    name: str = "answer"
    key: str = ""  #: the schema as canonical JSON text: the cache key of grammars and validators

    def openai(self) -> dict[str, Any]:
        """The OpenAI request field for this format (what ``saas/*`` sends upstream)."""
        if self.kind == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema, "strict": True}}

    def hint(self) -> str:
        """What a local engine adds to the system message: the schema, in words the model reads. Decoding is
        constrained anyway; a small model that also sees the schema closes its strings and ends its answer
        instead of running on to ``max_length`` (measured: SmolLM2 on llama.cpp, 50 extraction prompts,
        max_length 40: 5 answers cut without it, none with it, and 1.7x the answers/s)."""
        if self.kind == "json_object":
            return "Answer with a JSON object only."
        return "Answer with JSON only: a value that matches this JSON schema: " + self.key

    def check(self, text: str | None) -> str | None:
        """Why ``text`` is not a valid answer (not JSON, or not matching the schema), or None if it is."""
        try:
            value = json.loads(text or "")
        except ValueError as exc:
            return f"the answer is not JSON ({exc})"
        error = _validator(self.key).best_match_error(value)
        return None if error is None else f"the answer does not match the response_format schema: {error}"


class _Validator:
    def __init__(self, schema: dict) -> None:
        import jsonschema

        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        self.validator = cls(schema)

    def best_match_error(self, value: Any) -> str | None:
        import jsonschema

        error = jsonschema.exceptions.best_match(self.validator.iter_errors(value))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        return f"{error.message[:300]}" + (f" (at {where})" if where else "")


@functools.lru_cache(maxsize=256)
def _validator(key: str) -> _Validator:
    return _Validator(json.loads(key))


def parse_response_format(value: Any) -> ResponseFormat | None:
    """Parse a ``response_format`` value (dict or JSON text); None for ``{"type": "text"}``, null or ''.

    Raises:
        RequestParseError: not one of the accepted shapes, or the schema is not a valid JSON schema; the
            message names ``response_format``, the bad value and the fix.

    Example:
        >>> parse_response_format('{"type": "json_schema", "json_schema": {"schema": {"enum": ["a", "b"]}}}').schema
        {'enum': ['a', 'b']}
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (str, bytes)):
        return _parse_text(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        try:
            text = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
        except (TypeError, orjson.JSONEncodeError):
            raise RequestParseError(bad_value(PARAM, _cut(value), _FIX)) from None
        return _parse_text(text)
    raise RequestParseError(bad_value(PARAM, _cut(value), _FIX))


@functools.lru_cache(maxsize=256)
def _parse_text(text: str) -> ResponseFormat | None:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        if text.strip() in ("text", "json_object"):  # the bare type name
            value = {"type": text.strip()}
        else:
            raise RequestParseError(bad_value(PARAM, text[:200], "pass JSON text: " + _FIX)) from None
    if not isinstance(value, dict):
        raise RequestParseError(bad_value(PARAM, _cut(value), _FIX))
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")
        if schema is None:
            return _made("json_object", dict(ANY_OBJECT), "answer")
        return _made("json_schema", schema, "answer")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise RequestParseError(bad_value(
                f"{PARAM}.json_schema", _cut(spec),
                'pass {"name": "answer", "schema": {...}}: the JSON schema goes under json_schema.schema'))
        return _made("json_schema", spec["schema"], str(spec.get("name") or "answer"))
    raise RequestParseError(bad_value(f"{PARAM}.type", _cut(kind), _FIX))


def _made(kind: str, schema: Any, name: str) -> ResponseFormat:
    check_schema(schema, f"{PARAM} schema")
    key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode()
    return ResponseFormat(kind, schema, name, key)


def check_schema(schema: Any, param: str) -> None:
    """Refuse what is not a JSON schema object (jsonschema's meta-schema check).

    Raises:
        RequestParseError: naming ``param``, the schema and what is wrong with it.
    """
    if not isinstance(schema, dict) or not schema:
        raise RequestParseError(bad_value(param, _cut(schema), 'pass a JSON schema object such as '
                                          '{"type": "object", "properties": {"city": {"type": "string"}}}'))
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise RequestParseError(bad_value(
            param, _cut(schema), f"it is not a valid JSON schema: {exc.message[:200]}"
            + (f" (at {where})" if where else "")
        )) from None


def _cut(value: Any) -> Any:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:200] + "..."
