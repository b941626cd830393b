"""The driver of bench_multinode.py, run on node b of tests/_multinode.py's cluster; prints one JSON line.

    python benchmarks/_multinode_bench_driver.py RAY_ADDRESS SPARK_MASTER DRIVER_IP ROWS WORKERS REPEAT
"""

from __future__ import annotations

import json
import sys
import time

import byzerllm_spark as bls


def main() -> None:
    import ray
    from pyspark.sql import SparkSession

    ray_address, master, driver_ip, rows, workers, repeat = sys.argv[1:7]
    rows, workers, repeat = int(rows), int(workers), int(repeat)
    token = "multinode-test-token-0123456789"  # the same as tests/_multinode_driver.py: one Serve, one token
    bls.init(ray_address=ray_address, http_host="0.0.0.0", auth_token=token, proxy_location="EveryNode")
    deadline = time.monotonic() + 120
    while sum(1 for n in ray.nodes() if n["Alive"]) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    spark = (SparkSession.builder.master(master).appName("byzerllm-multinode-bench")
             .config("spark.driver.host", driver_ip).config("spark.ui.enabled", "false")
             .config("spark.executor.memory", "1g").config("spark.executor.cores", "1")
             .config("spark.executorEnv.BYZERLLM_AUTH_TOKEN", token).getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    def sql(n: int) -> str:
        return f"SELECT count(mb(llm_param(map('instruction', cast(id AS STRING))))) AS n FROM range(0, {n}, 1, 4)"

    seen = {}
    # Each node has 1 CPU: 0.4 per worker fits both on node a (pinned by its resource); 0.6 fits one per node.
    for label, placement in (("one_node", {"resources": {"node_a": 0.01}, "cpus_per_worker": 0.4}),
                             ("two_nodes", {"cpus_per_worker": 0.6})):
        bls.deploy("mb", pretrained_model_type="custom/echo", num_workers=workers, **placement)
        nodes = sorted({w["node_ip"] for w in bls.workers("mb")})
        assert len(nodes) == (1 if label == "one_node" else 2), (label, nodes)
        bls.register_model_function(spark, "mb", udf_name="mb")
        spark.sql(sql(min(rows, 2000))).collect()  # executors and workers warm
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            (n,) = spark.sql(sql(rows)).collect()[0]
            best = min(best, time.perf_counter() - started)
            assert n == rows, n
        seen[label] = rows / best
        bls.undeploy("mb")
    spark.stop()
    bls.shutdown()
    print("RESULT " + json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
