"""Faults a running query must survive, and callers that must not starve the others (issue 17).

Unit tests of the retry budget against local sockets; slow tests on the real Serve proxy, real HTTP
and a real Spark query (the echo plugin stands in for the model).
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import threading
import time

import pytest

from byzerllm_spark import transport
from byzerllm_spark.errors import ConfigError, RequestError

ECHO = "custom/echo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the retry budget (unit) ---------------------------------------------------------------------
def test_retry_budget_from_parameter_environment_or_default(monkeypatch):
    monkeypatch.delenv("BYZERLLM_RETRY_SECONDS", raising=False)
    assert transport.retry_seconds() == 60.0
    monkeypatch.setenv("BYZERLLM_RETRY_SECONDS", "7.5")
    assert transport.retry_seconds() == 7.5 and transport.retry_seconds(2) == 2.0
    for bad in (-1, "soon", float("inf"), True):
        with pytest.raises(ConfigError, match=r"retry_seconds=.*number >= 0"):
            transport.retry_seconds(bad)
    monkeypatch.setenv("BYZERLLM_RETRY_SECONDS", "x")
    with pytest.raises(ConfigError, match="BYZERLLM_RETRY_SECONDS='x'"):
        transport.retry_seconds()


def test_retries_last_for_the_budget_not_a_count():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: every try is refused at once
    started = time.monotonic()
    with pytest.raises(RequestError) as err:
        transport.post(url, "m", "arrow", b"x", retry_seconds=2.5)
    took = time.monotonic() - started
    assert 2.3 <= took <= 5, took
    assert "retry_seconds=2.5" in str(err.value) and "BYZERLLM_RETRY_SECONDS" in str(err.value)
    assert transport.last_retries() >= 4
    started = time.monotonic()
    with pytest.raises(RequestError):
        transport.post(url, "m", "arrow", b"x", retry_seconds=0)
    assert time.monotonic() - started < 1 and transport.last_retries() == 0


def test_a_server_that_comes_back_within_the_budget_answers():
    port = free_port()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    servers: list = []

    def start() -> None:  # nothing listens until then: the port refuses connections
        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler))
        servers[0].serve_forever()

    starter = threading.Timer(3.0, start)  # down for 3 s, past what the old 5 quick retries waited
    starter.start()
    try:
        assert transport.post(f"http://127.0.0.1:{port}", "m", "arrow", b"x", retry_seconds=20) == b"ok"
        assert transport.last_retries() >= 3
    finally:
        starter.cancel()
        starter.join()
        for server in servers:
            server.shutdown()
            server.server_close()


# ---- a Serve proxy restart during a Spark query ----------------------------------------------------
def _proxy_pid() -> int:
    import ray
    from ray.util.state import list_actors

    (proxy,) = list_actors(address=ray.get_runtime_context().gcs_address,  # this session's Ray, not another's
                           filters=[("class_name", "=", "ProxyActor"), ("state", "=", "ALIVE")])
    return int(proxy.pid)


@pytest.mark.slow
def test_proxy_killed_during_a_spark_query_every_row_answered_once(deployed, spark):
    import byzerllm_spark as bls

    n = 20_000
    deployed("faults_echo", pretrained_model_type=ECHO, num_workers=2, cpus_per_worker=0.1,
             infer_params={"echo_delay_ms": "0.5"})
    bls.register_model_function(spark, "faults_echo", fail_on_error=False, batch_size=100)
    spark.range(n).selectExpr("CAST(id AS STRING) AS q").repartition(2).createOrReplaceTempView("fault_qs")
    out: dict = {}

    def query() -> None:
        try:
            out["rows"] = spark.sql(
                "SELECT q, faults_echo(llm_param(map('instruction', q))) AS r FROM fault_qs").collect()
        except BaseException as exc:  # reported below
            out["error"] = exc

    before = _proxy_pid()
    runner = threading.Thread(target=query)
    runner.start()
    deadline = time.monotonic() + 120
    while sum(bls.stat("faults_echo")["total_requests"]) < 1000:  # the query is well under way
        assert runner.is_alive() and time.monotonic() < deadline, out
        time.sleep(0.05)
    os.kill(before, signal.SIGKILL)
    killed_at = time.monotonic()
    runner.join(300)
    assert not runner.is_alive()
    assert "error" not in out, out.get("error")
    rows = out["rows"]
    assert len(rows) == n and sorted(int(r.q) for r in rows) == list(range(n))  # every row once
    assert all(r.r.error is None and r.r.response == r.q for r in rows)
    assert sum(bls.stat("faults_echo")["total_requests"]) >= n
    assert _proxy_pid() != before  # Serve did restart its proxy, and the query outlived that
    assert time.monotonic() - killed_at > 5
