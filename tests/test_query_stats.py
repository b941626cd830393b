"""What a query cost: ``bls.track`` and ``bls.last_query_stats`` against real Spark, real Serve and real
models (the echo plugin for counts and errors, the embedded SmolLM2 on llama.cpp for tokens), the retry
count of the HTTP client against a real server, and ``chat_batch``'s progress bar."""

from __future__ import annotations

import threading
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import byzerllm_spark as bls
from byzerllm_spark import transport
from byzerllm_spark.errors import ConfigError
from byzerllm_spark.sql.functions import QueryStats
from byzerllm_spark.sql.udf import STAT_FIELDS

ROWS = 12_345
BAD_EVERY = 7  # every 7th row asks for temperature 'hot': a per-row error


@pytest.fixture(scope="module")
def echo(cluster, spark):
    bls.deploy("stats_echo", pretrained_model_type="custom/echo", num_workers=2, cpus_per_worker=0.1,
               worker_concurrency=2, udf_name="stats_chat", spark=spark)
    bls.register_model_function(spark, "stats_echo", udf_name="stats_rows", fail_on_error=False)
    yield "stats_echo"
    bls.undeploy("stats_echo")


@pytest.mark.slow
@pytest.mark.spark
def test_sql_query_reports_exactly_its_rows(spark, echo):
    sql = f"SELECT count(stats_chat(llm_param(map('instruction', cast(id AS string))))) AS n FROM range({ROWS})"
    with bls.track(spark) as q:
        assert spark.sql(sql).collect()[0].n == ROWS
    assert (q.rows, q.errors, q.retries, q.prompt_tokens, q.completion_tokens) == (ROWS, 0, 0, 0, 0)
    assert q.requests >= 2  # one per chunk of at most batch_size rows, per Spark task
    assert set(q.by_model) == {echo} and q.by_model[echo] == q.stats
    assert bls.last_query_stats(spark) == q.stats
    assert "rows=12345" in repr(q)

    spark.sql(sql.replace(str(ROWS), "10")).collect()  # outside the block: q stays as it was
    assert q.rows == ROWS and bls.last_query_stats().rows == 10


@pytest.mark.slow
@pytest.mark.spark
def test_errors_are_counted_with_fail_on_error_false(spark, echo):
    rows = spark.sql(
        "SELECT stats_rows(llm_param(map('instruction', cast(id AS string), 'temperature', "
        f"CASE WHEN id % {BAD_EVERY} = 0 THEN 'hot' ELSE '0' END))) AS r FROM range(1000)"
    ).collect()
    stats = bls.last_query_stats()
    bad = sum(1 for row in rows if row.r.error)
    assert bad == len(range(0, 1000, BAD_EVERY)) and "temperature='hot'" in rows[0].r.error
    assert (stats.rows, stats.errors) == (1000, bad)


@pytest.mark.slow
@pytest.mark.spark
def test_token_totals_equal_the_rows_metadata(spark, cluster, deployed):
    name = deployed("stats_smollm2", infer_backend="llama_cpp", cpus_per_worker=0.5)
    bls.register_model_function(spark, name, udf_name="stats_llm", fail_on_error=False)
    questions = ["What is the capital of France?", "Name a color.", "What is 2 + 2?", "Say hi."]
    spark.createDataFrame([(q,) for q in questions], "q string").createOrReplaceTempView("stats_questions")
    with bls.track(spark) as q:
        rows = spark.sql(
            "SELECT stats_llm(llm_param(map('instruction', q, 'max_length', '4', 'temperature', '0'))) AS r "
            "FROM stats_questions"
        ).collect()
    metadata = [row.r.metadata for row in rows]
    assert all(row.r.error is None for row in rows)
    prompt = sum(int(m["prompt_tokens"]) for m in metadata)
    completion = sum(int(m["completion_tokens"]) for m in metadata)
    assert prompt > 0 and completion > 0
    assert (q.rows, q.prompt_tokens, q.completion_tokens) == (len(questions), prompt, completion)
    assert bls.last_query_stats() == q.stats


def test_spark_connect_session_is_refused_with_the_alternative():
    connect_session = type("SparkSession", (), {"__module__": "pyspark.sql.connect.session"})()
    with pytest.raises(ConfigError) as err:
        bls.track(connect_session)
    assert "Spark Connect" in str(err.value) and "bls.stat(model)" in str(err.value)


def test_query_stats_fields_follow_the_executors_counters():
    assert tuple(f.name for f in fields(QueryStats))[: len(STAT_FIELDS)] == STAT_FIELDS


def test_query_stats_sum_per_model():
    stats = QueryStats.of({("3", "a"): (4, 1, 1, 0, 10, 5), ("4", "a"): (1, 1, 0, 2, 1, 1), ("3", "b"): (2, 1, 0, 0, 0, 0)})
    assert stats == QueryStats(rows=7, requests=3, errors=1, retries=2, prompt_tokens=11, completion_tokens=6)
    assert stats.by_model["a"] == QueryStats(5, 2, 1, 2, 11, 6) and stats.by_model["b"].rows == 2
    assert QueryStats.of({}) == QueryStats() and QueryStats.of({}).by_model == {}


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first ``fail`` POSTs, then 200."""

    fail = 2
    seen = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen += 1
        status = 503 if type(self).seen <= self.fail else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


def test_post_reports_its_retries():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert transport.post(endpoint, "m", "arrow", b"x", backoff=0.01) == b"ok"
        assert transport.last_retries() == 2
        assert transport.post(endpoint, "m", "arrow", b"x", backoff=0.01) == b"ok"
        assert transport.last_retries() == 0
    finally:
        server.shutdown()


@pytest.mark.slow
def test_chat_batch_progress_bar(echo, capsys):
    answers = bls.chat_batch(echo, [f"q{i}" for i in range(2500)], batch_size=1000, progress=True)
    assert answers[-1] == "q2499"
    assert "chat_batch stats_echo" in capsys.readouterr().err
    bls.chat_batch(echo, ["a", "b"])  # default: stderr is not a terminal here, so no bar
    assert capsys.readouterr().err == ""
