"""Structured output: ``response_format`` (OpenAI's shape) in ``llm_param``, ``bls.chat`` and ``/v1``, and model
functions with a ``return_type`` that return typed Spark columns.

Unit tests first (parsing, schema mapping, answer checks); then real engines: SmolLM2 on transformers
and on llama.cpp (llguidance masks both), a ``saas/openai`` deployment pointed at our own ``/v1``, and
the echo plugin (which cannot constrain: its answers are only checked).
"""

from __future__ import annotations

import json

import pytest
import requests

from byzerllm_spark.backends.base import ChatResult, check_structured
from byzerllm_spark.errors import ConfigError, RequestError, RequestParseError
from byzerllm_spark.protocol.request import parse_request
from byzerllm_spark.protocol.structured import parse_response_format
from byzerllm_spark.serving.openai import chat_params

CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
               "required": ["city", "year"], "additionalProperties": False}
CITY_FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": CITY_SCHEMA}}
LABELS = ["positive", "negative", "neutral"]


# ---- parsing and checking (no cluster) ------------------------------------------------------------
def test_response_format_shapes():
    fmt = parse_response_format(json.dumps(CITY_FORMAT))  # as a Spark map carries it: JSON text
    assert fmt.kind == "json_schema" and fmt.schema == CITY_SCHEMA and fmt.name == "place"
    assert parse_response_format(CITY_FORMAT) == fmt  # a dict parses the same
    assert parse_response_format({"type": "json_object"}).schema == {"type": "object"}
    # llama.cpp's shape: json_object with a schema
    assert parse_response_format({"type": "json_object", "schema": {"enum": ["a"]}}).schema == {"enum": ["a"]}
    assert parse_response_format({"type": "text"}) is None and parse_response_format("") is None
    assert fmt.openai() == {"type": "json_schema", "json_schema": {"name": "place", "schema": CITY_SCHEMA,
                                                                   "strict": True}}


@pytest.mark.parametrize("value, words", [
    ('{"type": "xml"}', ["response_format.type='xml'", '{"type": "json_object"}']),
    ("not json", ["response_format='not json'", "pass JSON text"]),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, ["response_format.json_schema=", "json_schema.schema"]),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}},
     ["response_format schema=", "not a valid JSON schema", "'strin'"]),
    ([1, 2], ["response_format=", "json_object"]),
])
def test_bad_response_format_names_the_parameter_value_and_fix(value, words):
    with pytest.raises(RequestParseError) as err:
        parse_request({"instruction": "x", "response_format": value})
    for word in words:
        assert word in str(err.value)


def test_request_keys_and_v1_body_carry_the_format():
    assert parse_request({"instruction": "x", "response_format": CITY_FORMAT}).response_format.schema == CITY_SCHEMA
    # generation.response_format (a deployment default, or an older client) is the same request
    assert parse_request({"instruction": "x", "generation.response_format": CITY_FORMAT}).response_format.schema \
        == CITY_SCHEMA
    params = chat_params({"model": "m", "messages": [{"role": "user", "content": "q"}], "response_format": CITY_FORMAT})
    assert params["response_format"] == CITY_FORMAT and parse_request(params).response_format.name == "place"


def test_answers_are_checked_never_passed_on_wrong():
    request = parse_request({"instruction": "x", "response_format": CITY_FORMAT, "max_length": 9})
    good = ChatResult(response='{"city": "Oslo", "year": 2001}', metadata={"finish_reason": "stop"})
    assert check_structured(request, good) is good
    for text, why in [('{"city": "Oslo", "year": "2001"}', "'2001' is not of type 'integer'"),
                      ('{"city": "Oslo"}', "'year' is a required property"),
                      ("Oslo, 2001", "the answer is not JSON")]:
        checked = check_structured(request, ChatResult(response=text, metadata={"finish_reason": "stop"}))
        assert why in checked.error and checked.response == text  # the error, and the raw text kept
    cut = check_structured(request, ChatResult(response='{"city": "Os', metadata={"finish_reason": "length"}))
    assert "cut at max_length=9" in cut.error
    plain = ChatResult(response="anything")
    assert check_structured(parse_request({"instruction": "x"}), plain) is plain


def test_local_engines_show_the_schema_in_the_system_message():
    from byzerllm_spark.backends.base import prompt_messages

    plain = parse_request({"instruction": "q", "system_msg": "Be brief."})
    assert prompt_messages(plain) == plain.messages()
    with_system = prompt_messages(parse_request({"instruction": "q", "system_msg": "Be brief.",
                                                 "response_format": CITY_FORMAT}))
    assert with_system[0]["content"].startswith("Be brief.\n\nAnswer with JSON only") and '"city"' in with_system[0]["content"]
    alone = prompt_messages(parse_request({"instruction": "q", "response_format": {"type": "json_object"}}))
    assert alone == [{"role": "system", "content": "Answer with a JSON object only."}, {"role": "user", "content": "q"}]


def test_typed_values_and_request_rows():
    import pyarrow as pa

    from byzerllm_spark.sql._structured import add_response_format, typed_values

    rows = add_response_format(pa.array(['{"instruction":"a"}', None, "{}", '{"response_format":"x"} ']), '{"t":1}')
    assert rows.to_pylist() == ['{"instruction":"a","response_format":{"t":1}}', None, '{"response_format":{"t":1}}',
                                '{"response_format":"x","response_format":{"t":1}}']
    assert json.loads(rows[3].as_py())["response_format"] == {"t": 1}  # the declared format, last, wins
    import orjson

    assert orjson.loads(rows[3].as_py())["response_format"] == {"t": 1}  # as the worker parses it
    kind = pa.struct([("city", pa.string()), ("year", pa.int32())])
    values, errors = typed_values(['{"city": "Oslo", "year": 2001}', None, '{"city": "Rome", "year": 99999999999}'],
                                  kind)
    assert values.to_pylist() == [{"city": "Oslo", "year": 2001}, None, None]
    assert errors[:2] == [None, None] and "does not fit" in errors[2]


def test_return_type_maps_ddl_and_json_schema(spark):
    from pyspark.sql import types as T

    from byzerllm_spark.sql._structured import parse_return_type

    dt, schema = parse_return_type("struct<city:string, year:int, tags:array<string>, score:double>")
    assert dt.simpleString() == "struct<city:string,year:int,tags:array<string>,score:double>"
    assert schema["required"] == ["city", "year", "tags", "score"] and schema["additionalProperties"] is False
    assert schema["properties"]["year"] == {"type": "integer", "minimum": -2 ** 31, "maximum": 2 ** 31 - 1}
    assert parse_return_type('{"enum": ["a", "b"]}')[0] == T.StringType()
    dt, schema = parse_return_type(CITY_SCHEMA)
    assert dt.simpleString() == "struct<city:string,year:bigint>" and schema == CITY_SCHEMA
    assert parse_return_type(CITY_FORMAT)[1] == CITY_SCHEMA  # a whole response_format
    for bad, words in [("struct<city:strin>", ["return_type='struct<city:strin>'", "Spark DDL"]),
                       ("struct<d:date>", ["return_type.d='date'", "no JSON form"]),
                       ('{"type": "object"}', ["give the object 'properties'"]),
                       ('{"anyOf": [{"type": "string"}]}', ["no Spark type"]),
                       ('{"type": 3}', ["return_type=", "not a valid JSON schema"])]:
        with pytest.raises(ConfigError) as err:
            parse_return_type(bad)
        for word in words:
            assert word in str(err.value)


# ---- real engines -------------------------------------------------------------------------------
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jon"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome", "Quito", "Delhi", "Vienna", "Dublin"]
VERBS = ["moved to", "was born in", "opened a bakery in", "visited", "studied in"]


def sentences(n: int) -> list[str]:
    return [f"{NAMES[i % 10]} {VERBS[i % 5]} {CITIES[(i * 3) % 10]} in {1950 + (i * 7) % 70}." for i in range(n)]


@pytest.fixture(scope="module")
def engines(cluster):
    """SmolLM2 on transformers and on llama.cpp, and saas/openai calling the llama.cpp one over our /v1."""
    import byzerllm_spark as bls

    bls.deploy("so_tf", infer_backend="transformers", cpus_per_worker=0.9)
    bls.deploy("so_cpp", infer_backend="llama_cpp", cpus_per_worker=0.9)
    bls.deploy("so_saas", pretrained_model_type="saas/openai", cpus_per_worker=0.1, worker_concurrency=4,
               infer_params={"saas.base_url": f"{bls.endpoint()}/v1", "saas.model": "so_cpp"})
    yield {"transformers": "so_tf", "llama_cpp": "so_cpp", "saas": "so_saas"}
    for name in ("so_saas", "so_cpp", "so_tf"):
        bls.undeploy(name)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", "llama_cpp", "saas"])
def test_sql_struct_return_type_parses_every_row(engines, spark, engine):
    """50 made-up sentences; every row is a struct<city:string, year:int> (the query fails on any that is not)."""
    import byzerllm_spark as bls

    model = engines[engine]
    name = bls.register_model_function(spark, model, udf_name=f"extract_{engine}",
                                       return_type="struct<city:string, year:int>")
    spark.createDataFrame([(t,) for t in sentences(50)], "txt string").createOrReplaceTempView("so_texts")
    df = spark.sql(f"SELECT txt, {name}(llm_param(map('instruction', concat('Extract city and year: ', txt), "
                   "'max_length', '40', 'temperature', '0'))) AS r FROM so_texts")
    assert df.schema["r"].dataType.simpleString() == "struct<city:string,year:int>"
    rows = df.select("txt", "r.city", "r.year").collect()
    assert len(rows) == 50
    assert all(isinstance(r.city, str) and r.city and isinstance(r.year, int) for r in rows), rows
    # and the values come from the sentence: most years are the sentence's own (SmolLM2-135M is no
    # great reader of cities; it gets these years right on every engine here)
    assert sum(str(r.year) in r.txt for r in rows) >= 35, rows


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", "llama_cpp"])
def test_enum_output_is_always_a_label(engines, engine):
    import byzerllm_spark as bls

    fmt = {"type": "json_schema", "json_schema": {"name": "sentiment", "schema": {"enum": LABELS}}}
    texts = [f"Classify the sentiment: {t}" for t in ("I love this phone", "The food was awful", "It is a chair",
                                                       "Best day ever", "I hate waiting", "The sky is blue")] * 4
    answers = bls.chat_batch(engines[engine], [{"instruction": t, "max_length": 8, "response_format": fmt,
                                                "temperature": 0.7} for t in texts])
    assert len(answers) == 24 and all(json.loads(a) in LABELS for a in answers), answers


@pytest.mark.slow
def test_fail_on_error_false_gives_error_and_raw_text(deployed, spark):
    """The echo plugin cannot constrain: it gets the schema in its kwargs, and its answers are checked, so a
    row that is not the declared type has its error and raw text, never a silently wrong value."""
    import byzerllm_spark as bls

    deployed("so_echo", pretrained_model_type="custom/echo", cpus_per_worker=0.1)
    bls.register_model_function(spark, "so_echo", udf_name="echo_typed", fail_on_error=False,
                                return_type="struct<city:string, year:int>")
    rows = [('{"city": "Oslo", "year": 2001}',), ('{"city": "Rome", "year": "1999"}',), ("Lima, 1990",), (None,)]
    spark.createDataFrame(rows, "txt string").createOrReplaceTempView("so_echo_in")
    got = spark.sql("SELECT echo_typed(llm_param(map('instruction', txt))) AS r FROM so_echo_in").collect()
    good, wrong_type, not_json, null = (row.r for row in got)
    assert good.value.asDict() == {"city": "Oslo", "year": 2001} and good.error is None
    assert json.loads(good.metadata["kw.json_schema"].replace("'", '"').replace("False", "false"))["required"] \
        == ["city", "year"]
    assert wrong_type.value is None and "'1999' is not of type 'integer'" in wrong_type.error
    assert wrong_type.response == '{"city": "Rome", "year": "1999"}'  # the raw text
    assert not_json.value is None and "not JSON" in not_json.error and not_json.response == "Lima, 1990"
    assert null is None
    with pytest.raises(ConfigError, match="return_type='struct<city:strin>'"):
        bls.register_model_function(spark, "so_echo", udf_name="bad_typed", return_type="struct<city:strin>")


@pytest.mark.slow
def test_v1_and_bls_chat_honour_response_format(engines):
    import byzerllm_spark as bls

    url = f"{bls.endpoint()}/v1/chat/completions"
    messages = [{"role": "user", "content": "Extract city and year: Ana moved to Lima in 1987."}]
    body = {"model": "so_cpp", "messages": messages, "max_tokens": 40, "temperature": 0}
    answer = requests.post(url, json={**body, "response_format": CITY_FORMAT}, timeout=120).json()
    value = json.loads(answer["choices"][0]["message"]["content"])
    assert set(value) == {"city", "year"} and isinstance(value["year"], int)
    answer = requests.post(url, json={**body, "response_format": {"type": "json_object"}}, timeout=120).json()
    assert isinstance(json.loads(answer["choices"][0]["message"]["content"]), dict)
    bad = requests.post(url, json={**body, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}, timeout=60)
    assert bad.status_code == 400 and "response_format schema=" in bad.json()["error"]["message"]
    text = bls.chat("so_tf", "Extract city and year: Ben was born in Oslo in 1960.", response_format=CITY_FORMAT,
                    max_length=40)
    assert set(json.loads(text)) == {"city", "year"}
    with pytest.raises(RequestError, match=r"response_format.type='yaml'"):
        bls.chat("so_tf", "x", response_format={"type": "yaml"})


def test_grammar_library_stays_lazy():
    """``import byzerllm_spark`` and parsing (and checking) a structured request load no engine or grammar
    library: llguidance is imported by the transformers worker that constrains, llama.cpp's grammar by its."""
    import subprocess
    import sys

    code = (
        "import sys, byzerllm_spark\n"
        "from byzerllm_spark.protocol.request import parse_request\n"
        f"r = parse_request({{'instruction': 'x', 'response_format': {CITY_FORMAT!r}}})\n"
        "assert r.response_format.check('{\"city\": \"Oslo\", \"year\": 1}') is None\n"
        "print([m for m in ('torch', 'transformers', 'llguidance', 'llama_cpp', 'pyspark') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
