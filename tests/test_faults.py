"""Faults a running query must survive, and callers that must not starve the others (issue 17).

Unit tests of the retry budget against local sockets; slow tests on the real Serve proxy, real HTTP
and a real Spark query (the echo plugin stands in for the model).
"""

from __future__ import annotations

import http.client
import http.server
import json
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
        starter.cancel()  # not started yet: it never will be
        for server in servers:  # started: serve_forever runs in the timer's thread until shutdown()
            server.shutdown()
            server.server_close()
        starter.join()


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


# ---- a caller that went away (unit: the worker class, outside Serve) --------------------------------
def test_rows_of_a_caller_that_went_away_are_not_counted_answered(monkeypatch):
    import asyncio

    from byzerllm_spark.config import DeployConfig, InferParams
    from byzerllm_spark.serving import replica, stats

    reports: list = []

    class FakeStats:  # the stats actor: the snapshots stat() would read
        class report:
            @staticmethod
            def remote(name, snapshot):
                reports.append(snapshot)

    monkeypatch.setattr(stats, "get_stats_actor", lambda model: FakeStats)
    monkeypatch.setattr(replica, "_auth_digest", lambda: None)  # no Ray is started for this test
    monkeypatch.setattr(replica, "_node_ip", lambda: "127.0.0.1")
    config = DeployConfig(model="gone_count", pretrained_model_type=ECHO, cpus_per_worker=0.1,
                          infer_params=InferParams.parse({"echo_delay_ms": "300"}))

    def rows(*texts):
        return [json.dumps({"instruction": t}) for t in texts]

    async def scenario() -> None:
        worker = replica.ModelWorker(config)
        answers = await worker.run_batch(rows("a", "b"))
        assert [a.response for a in answers] == ["a", "b"]
        assert reports[-1]["total_requests"] == 2 and reports[-1]["in_flight"] == 0

        # Serve cancels a batch whose caller went away: the engine stops after its current row
        # (300 ms), the worker stays busy (its slot taken) until then, and none of the batch's rows
        # count as answered.
        batch = asyncio.ensure_future(worker.run_batch(rows("c", "d", "e", "f")))
        await asyncio.sleep(0.1)
        assert reports[-1]["in_flight"] == 1
        cancelled = time.monotonic()
        batch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await batch
        assert reports[-1]["in_flight"] == 1  # the engine is still on its row
        assert [a.response for a in await worker.run_batch(rows("k"))] == ["k"]  # waits for the slot
        assert 0.15 < time.monotonic() - cancelled < 1.0  # the engine's row, not the cancelled batch's 1.2 s
        assert reports[-1]["total_requests"] == 3 and reports[-1]["in_flight"] == 0

        # The same under an anyio cancel scope (Starlette's, when a client disconnects), which cancels
        # every later await too: the slot still stays taken until the engine has stopped.
        import anyio

        with anyio.CancelScope() as scope:
            asyncio.get_running_loop().call_later(0.1, scope.cancel)
            await worker.run_batch(rows("l", "m", "n"))
        assert scope.cancelled_caught and reports[-1]["in_flight"] == 1
        cancelled = time.monotonic()
        while reports[-1]["in_flight"]:
            await asyncio.sleep(0.01)
        assert 0.1 < time.monotonic() - cancelled < 1.0 and reports[-1]["total_requests"] == 3

        # A stream closed before its end: not answered.
        items = worker.stream_chat({"instruction": "g"})
        assert await items.__anext__() == {"text": "g"}
        assert reports[-1]["in_flight"] == 1
        await items.aclose()
        await asyncio.sleep(0.05)  # the engine's task ends (the slot is freed then)
        assert reports[-1]["total_requests"] == 3 and reports[-1]["in_flight"] == 0

        # A stream read to its end counts, also when its consumer stops once it has the metadata.
        assert [item async for item in worker.stream_chat({"instruction": "h"})][0] == {"text": "h"}
        items = worker.stream_chat({"instruction": "i"})
        assert await items.__anext__() == {"text": "i"}
        assert "metadata" in await items.__anext__()
        await items.aclose()
        assert reports[-1]["total_requests"] == 5 and reports[-1]["in_flight"] == 0

        # An answered batch still counts every row, errors included (an unparseable row is answered).
        answers = await worker.run_batch([*rows("j"), "{not json"])
        assert answers[0].response == "j" and answers[1].error
        assert reports[-1]["total_requests"] == 7

    import ray

    ray_before = ray.is_initialized()  # the session's Ray when slow tests ran first
    asyncio.run(scenario())
    assert ray.is_initialized() == ray_before  # the worker class started no Ray of its own


# ---- one caller cannot starve the others ---------------------------------------------------------
def _stalled_upload(base: str, path: str) -> socket.socket:
    """A POST that declares a 10 MB body, sends 10 bytes of it and stalls."""
    host, port = base.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 10000000\r\n\r\n{{\"instruc".encode())
    return sock


@pytest.mark.slow
def test_stalled_uploads_and_a_gone_huge_request_do_not_starve_the_next_caller(deployed):
    import requests

    import byzerllm_spark as bls
    from byzerllm_spark.protocol import arrow

    # One worker with one slot: anything that held it would block the normal request below.
    deployed("faults_starve", pretrained_model_type=ECHO, num_workers=1, worker_concurrency=1, cpus_per_worker=0.1,
             infer_params={"echo_delay_ms": "20"})
    base = bls.endpoint()
    stalled = [_stalled_upload(base, "/faults_starve/arrow"), _stalled_upload(base, "/faults_starve/stream")]
    try:
        time.sleep(1)
        started = time.monotonic()
        assert bls.chat("faults_starve", "first") == "first"  # answered while both uploads stall
        assert time.monotonic() - started < 5
        assert bls.stat("faults_starve")["busy_workers"] == 0  # a stalled upload holds no worker

        # 5000 rows x 20 ms = 100 s of work; its client gives up after 3 s.
        body = arrow.encode_params([json.dumps({"instruction": f"row {i}"}) for i in range(5000)])
        outcome: list = []

        def huge() -> None:
            try:
                requests.post(f"{base}/faults_starve/arrow", data=body, timeout=4,
                              headers={"Content-Type": arrow.CONTENT_TYPE})
            except requests.exceptions.ReadTimeout as exc:
                outcome.append(exc)

        client = threading.Thread(target=huge)
        client.start()
        busy_seen = False
        while client.is_alive():  # while it works, stat says so
            busy_seen = busy_seen or bls.stat("faults_starve")["busy_workers"] == 1
            time.sleep(0.1)
        assert busy_seen and outcome, outcome
        gone = time.monotonic()
        while bls.stat("faults_starve")["busy_workers"]:  # the engine stops once its caller is gone
            assert time.monotonic() - gone < 5, "the worker kept working for a caller that left"
            time.sleep(0.1)
        started = time.monotonic()
        assert bls.chat("faults_starve", "second") == "second"
        assert time.monotonic() - started < 5  # one slot: only free because the 100 s of work stopped

        for sock in stalled:  # the stalled uploads end with 408 once the body timeout passes
            sock.settimeout(60)
            assert sock.recv(200).startswith(b"HTTP/1.1 408")
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.slow
def test_a_gone_stream_stops_its_worker(deployed):
    import requests

    import byzerllm_spark as bls

    deployed("faults_stream", pretrained_model_type="custom/auto", infer_backend="transformers", num_workers=1,
             cpus_per_worker=1)
    # min_new_tokens: no end-of-sequence before 8000 tokens, minutes of generation on a CPU.
    resp = requests.post(f"{bls.endpoint()}/faults_stream/stream", stream=True, timeout=60,
                         json={"instruction": "Count to ten thousand.", "max_length": 8000,
                               "generation.min_new_tokens": 8000})
    assert resp.status_code == 200
    # One iterator for the whole read: a discarded requests line iterator closes the connection when it
    # is collected (``next(resp.iter_lines())`` alone is a client that leaves after its first line).
    lines = resp.iter_lines()
    texts = 0
    connected = time.monotonic()
    while texts < 20 or time.monotonic() - connected < 2:  # while the client reads, the worker is busy
        line = next(lines)
        if line.startswith(b"data:"):
            assert "text" in json.loads(line[5:]), line  # still generating: no metadata (end), no error
            texts += 1
        assert bls.stat("faults_stream")["busy_workers"] == 1
    resp.close()  # the client goes away mid-answer
    gone = time.monotonic()
    while bls.stat("faults_stream")["busy_workers"]:
        assert time.monotonic() - gone < 10, "the worker kept generating for a caller that left"
        time.sleep(0.1)
    started = time.monotonic()
    assert bls.chat("faults_stream", "Say hi", max_length=4)
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_max_length_above_the_context_is_refused_on_every_surface(deployed):
    import requests

    import byzerllm_spark as bls

    deployed("faults_ctx", pretrained_model_type=ECHO, cpus_per_worker=0.1)
    fix = "pass max_length <= 8192"
    with pytest.raises(RequestError, match=f"max_length=1000000000000 .*8192 tokens; {fix}"):
        bls.chat("faults_ctx", "x", max_length=10**12)
    with pytest.raises(RequestError, match="generation.min_new_tokens=100000 .*pass generation.min_new_tokens <= 8192"):
        bls.chat("faults_ctx", "x", **{"generation.min_new_tokens": 100000})
    with pytest.raises(RequestError, match=fix):
        list(bls.stream_chat("faults_ctx", "x", max_length=10**12))
    resp = requests.post(f"{bls.endpoint()}/faults_ctx/stream", json={"instruction": "x", "max_length": 10**12},
                         timeout=60)
    assert resp.status_code == 400 and fix in resp.text
    for stream in (False, True):
        resp = requests.post(f"{bls.endpoint()}/v1/chat/completions", timeout=60, json={
            "model": "faults_ctx", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12,
            "stream": stream})
        assert resp.status_code == 400 and fix in resp.json()["error"]["message"], resp.text
    assert bls.chat("faults_ctx", "fine", max_length=8192) == "fine"


@pytest.mark.slow
def test_a_body_over_the_size_limit_is_refused_unread(deployed):
    import byzerllm_spark as bls
    from byzerllm_spark.serving import replica

    deployed("faults_big", pretrained_model_type=ECHO, cpus_per_worker=0.1)
    host, port = bls.endpoint().split("//")[1].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST /faults_big/arrow HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Length: {replica.MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        sock.settimeout(30)
        answer = http.client.HTTPResponse(sock)   # the head and the body may come in separate packets
        answer.begin()
        body = answer.read()
    assert answer.status == 413 and b"batch_size" in body, (answer.status, body)
