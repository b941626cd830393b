"""Beyond one machine: a real two-node Ray cluster and a Spark standalone cluster (tests/_multinode.py),
a driver on the node that is not the Ray head, workers on both nodes, every Spark executor through the
Serve proxy of its own node, and a node's worker killed mid-query with every row answered once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import _multinode

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("_multinode_driver.py")


@pytest.fixture(scope="module")
def two_nodes():
    why = _multinode.unavailable()
    if why:
        pytest.skip(f"no two-node cluster on this machine: {why}")
    cluster = _multinode.Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def test_an_executor_whose_host_runs_no_proxy_uses_the_heads():
    import socket

    from byzerllm_spark import transport

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    here, nobody = listening.getsockname()[1], closed.getsockname()[1]
    try:
        head = "http://10.0.0.1:8000"
        assert transport.local_or_fallback(f"http://127.0.0.1:{here}", head) == f"http://127.0.0.1:{here}"
        assert transport.local_or_fallback(f"http://127.0.0.1:{nobody}", head) == head
        assert transport.local_or_fallback(f"http://127.0.0.1:{nobody}", None) == f"http://127.0.0.1:{nobody}"
    finally:
        listening.close()
        closed.close()


def test_a_local_proxy_that_does_not_serve_the_model_is_passed_over():
    """Another Ray cluster's Serve on this host's port (it serves other models) is not this cluster's proxy."""
    import http.server
    import threading

    from byzerllm_spark import transport

    def serving(*models):
        class Routes(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({f"/{m}": m for m in models}).encode()
                self.send_response(200 if self.path == "/-/routes" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Routes)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    (other, local), (ours, head) = serving("theirs"), serving("ours")
    try:
        assert transport.local_or_fallback(local, head, "ours") == head
        assert transport.local_or_fallback(local, head, "theirs") == local
        assert transport.local_or_fallback(local, head, "nobodys") == local  # its error names what is there
        assert transport.local_or_fallback(local, head) == local
    finally:
        other.shutdown()
        ours.shutdown()


def test_a_query_from_a_standalone_spark_cluster_across_two_ray_nodes(two_nodes):
    done = two_nodes.run_python("b", str(DRIVER), two_nodes.ray_address, two_nodes.spark_master,
                                two_nodes.nodes["b"][1])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    seen = json.loads(lines[-1][len("RESULT "):])
    node_a, node_b = two_nodes.nodes["a"][1], two_nodes.nodes["b"][1]
    # The driver joined a cluster whose head is another host; each node's proxy is at its own loopback.
    assert seen["embedded"] is False and seen["endpoint"].startswith("http://127.0.0.1:")
    assert seen["worker_nodes"] == sorted([node_a, node_b])          # num_workers=2 spread over both
    assert seen["pinned_nodes"] == [node_a]                          # resources={"node_a": ...}
    assert seen["table_nodes"] == sorted([node_a, node_b])           # a model table, loaded on each node
    assert seen["table_answer"] == "from a table"
    assert seen["executor_nodes"] == sorted([node_a, node_b])        # executors on both Spark workers
    # Every row answered once and right, although node a's worker was killed mid-query.
    assert seen["killed"] == node_a
    assert seen["error"] is None and seen["rows"] == 20000
    assert seen["ids_once"] and seen["all_right"]
    assert seen["stat_workers"] == 2


def test_the_multinode_benchmark_runs(two_nodes):
    """benchmarks/bench_multinode.py's driver at smoke size on this cluster (so the bench cannot rot
    unseen; run_all.py leaves it out: it needs root and a cluster of its own)."""
    import math

    driver = Path(__file__).parent.parent / "benchmarks" / "_multinode_bench_driver.py"
    done = two_nodes.run_python("b", str(driver), two_nodes.ray_address, two_nodes.spark_master,
                                two_nodes.nodes["b"][1], "2000", "2", "1")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    seen = json.loads(lines[-1][len("RESULT "):])
    assert set(seen) == {"one_node", "two_nodes"}
    assert all(math.isfinite(v) and v > 0 for v in seen.values()), seen


def test_ray_on_spark_on_the_standalone_cluster(two_nodes):
    """``bls.init(spark=..., ray_on_spark_workers=1)``: Ray's head on the driver (node b), a Ray worker
    node inside a Spark task; a model deployed there answers a query from the other executor, whose
    host reaches the head's proxy; ``shutdown()`` takes the Ray cluster down."""
    import shutil
    import tempfile

    driver = Path(__file__).with_name("_ray_on_spark_driver.py")
    temp = tempfile.mkdtemp(prefix="ros")  # short: Ray's socket paths under it must stay within 107 bytes
    try:
        done = two_nodes.run_python("b", str(driver), two_nodes.spark_master, two_nodes.nodes["b"][1], temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    seen = json.loads(lines[-1][len("RESULT "):])
    assert seen["embedded"] is False and seen["ray_head"] == two_nodes.nodes["b"][1]
    assert seen["ray_nodes"] == 2 and seen["worker_node_cpus"] == [0, 1]    # head: no CPUs; one worker node
    assert len(seen["worker_nodes"]) == 1 and seen["worker_nodes"][0] in {ip for _, ip in two_nodes.nodes.values()}
    assert seen["error"] is None, seen["error"]
    assert seen["rows"] == 2000 and seen["ids_once"] and seen["all_right"]
    assert seen["stat_requests"] >= 2000
    assert seen["ray_after_shutdown"] is False
