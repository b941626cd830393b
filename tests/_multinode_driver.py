"""The driver of tests/test_multinode.py, run on node b (not the Ray head) of the two-node cluster of
tests/_multinode.py: joins Ray, deploys across both nodes, queries from the standalone Spark cluster
with a worker killed mid-query, and prints what it saw as one JSON line (the test asserts on it).

    python tests/_multinode_driver.py RAY_ADDRESS SPARK_MASTER DRIVER_IP
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

import byzerllm_spark as bls

ROWS = 20000


def executor_address(master_ip: str) -> str:
    """The address this executor's host uses towards the master (its node's address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((master_ip, 9))
    address = sock.getsockname()[0]
    sock.close()
    return address


def main() -> None:
    import ray
    from pyspark.sql import SparkSession

    ray_address, master, driver_ip = sys.argv[1:4]
    token = "multinode-test-token-0123456789"
    seen: dict = {}
    info = bls.init(ray_address=ray_address, http_host="0.0.0.0", auth_token=token, proxy_location="EveryNode")
    seen["endpoint"] = info.endpoint
    seen["embedded"] = info.embedded
    deadline = time.monotonic() + 120  # node b's raylet registers with the head a little after it starts
    while sum(1 for n in ray.nodes() if n["Alive"]) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    bls.deploy("mn_echo", pretrained_model_type="custom/echo", num_workers=2, cpus_per_worker=0.5,
               infer_params={"echo_delay_ms": "0.2"})
    seen["worker_nodes"] = sorted(w["node_ip"] for w in bls.workers("mn_echo"))
    # From a model table: each node's worker materialises it into its own cache (the table is on this
    # machine's disk, which both "hosts" see, as a shared store would be on a real cluster).
    import os
    import tempfile

    model_dir = tempfile.mkdtemp(prefix="mn-model-")
    with open(os.path.join(model_dir, "weights.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
    table = os.path.join(tempfile.mkdtemp(prefix="mn-table-"), "echo_model")
    bls.save_model_table(model_dir, table)
    bls.deploy("mn_table", pretrained_model_type="custom/echo", model_table=table, num_workers=2,
               cpus_per_worker=0.3)  # 0.5 + 0.3 x 2 does not fit one node (1 CPU each): one per node
    seen["table_nodes"] = sorted(w["node_ip"] for w in bls.workers("mn_table"))
    seen["table_answer"] = bls.chat("mn_table", "from a table")
    bls.undeploy("mn_table")
    # Pinned by a node's custom resource (Byzer-LLM's `resource.<node>`): the worker lands on that node.
    bls.deploy("mn_pinned", pretrained_model_type="custom/echo", cpus_per_worker=0.1, resources={"node_a": 0.5})
    seen["pinned_nodes"] = [w["node_ip"] for w in bls.workers("mn_pinned")]

    spark = (SparkSession.builder.master(master).appName("byzerllm-multinode-test")
             .config("spark.driver.host", driver_ip).config("spark.ui.enabled", "false")
             .config("spark.executor.memory", "512m").config("spark.executor.cores", "1")
             .config("spark.executorEnv.BYZERLLM_AUTH_TOKEN", token).getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    master_ip = master.split("//")[1].split(":")[0]
    # Both workers' executors registered (they start as the application does).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() < 3:
        time.sleep(1)
    seen["executor_nodes"] = sorted(set(
        spark.sparkContext.parallelize(range(8), 8).map(lambda _: executor_address(master_ip)).collect()))
    bls.register_model_function(spark, "mn_echo", udf_name="chat", batch_size=200, concurrency=2)

    result: dict = {}

    def query() -> None:
        try:
            result["rows"] = spark.sql(
                f"SELECT id, chat(llm_param(map('instruction', cast(id AS STRING)))) AS a FROM range(0, {ROWS}, 1, 4)"
            ).collect()
        except Exception as exc:  # reported to the test
            result["error"] = repr(exc)[:2000]

    thread = threading.Thread(target=query)
    thread.start()
    deadline = time.monotonic() + 120
    while sum(bls.stat("mn_echo")["total_requests"]) < 2000 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    # Kill the worker on the head's node, as a node's worker process dying would.
    victim = next(w for w in bls.workers("mn_echo") if w["node_ip"] == master_ip)
    ray.kill(ray.get_actor(victim["replica"], namespace="serve"), no_restart=True)
    seen["killed"] = victim["node_ip"]
    thread.join(timeout=400)
    rows = result.get("rows") or []
    seen["error"] = result.get("error")
    seen["rows"] = len(rows)
    seen["ids_once"] = sorted(r.id for r in rows) == list(range(ROWS))
    seen["all_right"] = all(r.a == str(r.id) for r in rows)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(bls.workers("mn_echo")) < 2:  # the killed worker's replacement
        time.sleep(1)
    stat = bls.stat("mn_echo")
    seen["stat_workers"] = stat["total_workers"]
    seen["workers_after"] = sorted(w["node_ip"] for w in bls.workers("mn_echo"))
    spark.stop()
    for model in ("mn_echo", "mn_pinned"):
        bls.undeploy(model)
    bls.shutdown()
    print("RESULT " + json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
