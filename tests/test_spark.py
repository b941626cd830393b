"""Spark SQL and DataFrame functions against real Serve deployments (real Spark, real HTTP)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

import byzerllm_spark as bls
from byzerllm_spark.errors import ModelNotFoundError
from byzerllm_spark.functions import llm_param, llm_prompt, model_function

pytestmark = [pytest.mark.slow, pytest.mark.spark]

SEED_001_SQL = """
select {fn}(llm_param(map(
              "user_role","User",
              "assistant_role","Assistant",
              "system_msg",'You are a helpful assistant. Think it over and answer the user question correctly.',
              "temperature",{temperature},
              "instruction",llm_prompt('
你好，请记住我的名字：{{0}}
',array("祝威廉")),
              "generation.image","https://www.baidu.com/img/flexible/logo/pc/result.png"
))) as q
"""


@pytest.fixture(scope="module")
def echo(cluster, spark):
    bls.deploy("sql_echo", pretrained_model_type="custom/echo", num_workers=2, cpus_per_worker=0.1,
               worker_concurrency=2, udf_name="echo_chat", spark=spark)
    yield "sql_echo"
    bls.undeploy("sql_echo")


def test_llm_param_and_llm_prompt(spark, echo):
    row = spark.sql(
        "SELECT llm_param(map('instruction', 'hi', 'temperature', '0')) AS p, "
        "llm_prompt('a {0} b {1} c {2}', array('x', 'y')) AS t"
    ).first()
    assert json.loads(row.p) == {"instruction": "hi", "temperature": "0"}
    assert row.t == "a x b y c {2}"


def test_seed_001_example_runs_as_written(spark, echo):
    # Spark 4 ANSI mode: a map mixing strings and the number 0.3 fails to coerce; quote the number.
    (row,) = spark.sql(SEED_001_SQL.format(fn="echo_chat", temperature="'0.3'")).collect()
    assert row.q.strip() == "你好，请记住我的名字：祝威廉"
    # With ANSI mode off, the seed's unquoted 0.3 works unchanged.
    spark.conf.set("spark.sql.ansi.enabled", "false")
    try:
        (row,) = spark.sql(SEED_001_SQL.format(fn="echo_chat", temperature="0.3")).collect()
        assert row.q.strip() == "你好，请记住我的名字：祝威廉"
    finally:
        spark.conf.set("spark.sql.ansi.enabled", "true")
    # The keys reach the plugin's stream_chat as the seed says (generation.image -> image).
    bls.register_model_function(spark, echo, udf_name="echo_struct", fail_on_error=False)
    (row,) = spark.sql(SEED_001_SQL.format(fn="echo_struct", temperature="'0.3'")).collect()
    meta = row.q.metadata
    assert meta["kw.image"] == "https://www.baidu.com/img/flexible/logo/pc/result.png"
    assert meta["kw.user_role"] == "User" and meta["kw.assistant_role"] == "Assistant"
    assert meta["kw.system_msg"].startswith("You are a helpful assistant.")


def test_dataframe_api_order_and_nulls(spark, echo):
    from pyspark.sql import functions as F

    df = spark.createDataFrame([(f"q{i}" if i % 7 else None,) for i in range(500)], "q string").repartition(3)
    fn = model_function(echo, batch_size=37, concurrency=3)
    out = df.withColumn("a", fn(llm_param({"instruction": F.col("q"), "temperature": 0}))).collect()
    assert len(out) == 500
    for row in out:
        assert row.a == row.q  # every answer belongs to its own row; null in, null out
    prompts = spark.createDataFrame([("Zhu",)], "name string").select(
        llm_prompt("name: {0}", [F.col("name")]).alias("p")).first()
    assert prompts.p == "name: Zhu"


def test_struct_result_and_llm_result(spark, echo):
    bls.register_model_function(spark, echo, udf_name="echo_safe", fail_on_error=False)
    spark.createDataFrame([("a", "0"), ("b", "hot"), (None, "0")], "q string, t string").createOrReplaceTempView("tq")
    rows = spark.sql(
        "SELECT q, echo_safe(llm_param(map('instruction', q, 'temperature', t))) AS r, "
        "llm_result(echo_safe(llm_param(map('instruction', q)))) AS text, "
        "llm_result(echo_chat(llm_param(map('instruction', q)))) AS text2 FROM tq ORDER BY q"
    ).collect()
    by_q = {r.q: r for r in rows}
    assert by_q["a"].r.response == "a" and by_q["a"].r.error is None and by_q["a"].text == "a"
    assert by_q["b"].r.response is None and "temperature='hot'" in by_q["b"].r.error
    assert by_q["b"].text == "b" and by_q["a"].text2 == "a"
    assert by_q[None].r is None and by_q[None].text is None


def test_20000_rows_each_answer_belongs_to_its_row(spark, echo):
    bls.register_model_function(spark, echo, udf_name="echo_big", batch_size=500, concurrency=4)
    df = spark.sql(
        "SELECT id, echo_big(llm_param(map('instruction', concat('row-', cast(id AS STRING))))) AS a "
        "FROM range(0, 20000, 1, 4)"
    )
    rows = df.collect()
    assert len(rows) == 20000
    assert all(r.a == f"row-{r.id}" for r in rows)
    assert sum(bls.stat(echo)["total_requests"]) >= 20000


def test_worker_killed_mid_query_every_row_answered_once(spark, cluster, deployed):
    name = deployed("sql_kill", pretrained_model_type="custom/echo", num_workers=2, cpus_per_worker=0.1,
                    infer_params={"echo_delay_ms": "0.2"})
    bls.register_model_function(spark, name, udf_name="kill_chat", batch_size=200, concurrency=2)
    victim = bls.workers(name)[0]["pid"]
    result: dict = {}

    def run() -> None:
        result["rows"] = spark.sql(
            "SELECT id, kill_chat(llm_param(map('instruction', cast(id AS STRING)))) AS a FROM range(0, 20000, 1, 2)"
        ).collect()

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 60
    while sum(bls.stat(name)["total_requests"]) < 2000 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    rows = result["rows"]
    assert len(rows) == 20000
    assert sorted(r.id for r in rows) == list(range(20000))
    assert all(r.a == str(r.id) for r in rows)
    pids = [w["pid"] for w in bls.workers(name)]
    assert victim not in pids


def test_malformed_calls_say_what_to_fix(spark, echo):
    from pyspark.errors import AnalysisException, PythonException

    with pytest.raises(AnalysisException) as err:
        spark.sql("SELECT echo_chat(llm_param('not a map'))").collect()
    assert "llm_param" in str(err.value)
    with pytest.raises(PythonException) as err:
        spark.sql("SELECT echo_chat(llm_param(map('instruction', 'x', 'temperature', 'warm')))").collect()
    assert "temperature='warm' is not valid" in str(err.value) and "fail_on_error=False" in str(err.value)
    with pytest.raises(ModelNotFoundError) as err:
        bls.register_model_function(spark, "no_such_model", udf_name="nope")
    assert "'no_such_model' is not deployed" in str(err.value) and echo in str(err.value)


def test_model_removed_after_registration_names_it(spark, cluster, deployed):
    from pyspark.errors import PythonException

    name = deployed("sql_gone", pretrained_model_type="custom/echo", cpus_per_worker=0.1)
    bls.register_model_function(spark, name, udf_name="gone_chat")
    bls.undeploy(name)
    with pytest.raises(PythonException) as err:
        spark.sql("SELECT gone_chat(llm_param(map('instruction', 'x')))").collect()
    assert "'sql_gone' is not deployed" in str(err.value)


def test_embeddings_function_with_minilm(spark, cluster, deployed):
    name = deployed("minilm", infer_backend="embedding", cpus_per_worker=1)
    bls.register_model_function(spark, name, udf_name="emb")
    rows = spark.sql(
        "SELECT s, emb(s) AS v FROM VALUES ('A cat sits on the mat.'), ('A kitten is on the rug.'), "
        "('Stock markets fell sharply today.') AS t(s)"
    ).collect()
    vectors = {r.s: r.v for r in rows}
    assert all(len(v) == 384 for v in vectors.values())

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))

    cat = vectors["A cat sits on the mat."]
    kitten = vectors["A kitten is on the rug."]
    stocks = vectors["Stock markets fell sharply today."]
    assert abs(cos(cat, cat) - 1) < 1e-4  # normalised
    assert cos(cat, kitten) > cos(cat, stocks) + 0.2
    assert bls.embed(name, ["A cat sits on the mat."])[0] == pytest.approx(cat, abs=1e-5)
