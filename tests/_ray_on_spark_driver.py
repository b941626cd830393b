"""Ray on Spark on the standalone cluster of tests/_multinode.py, run on node b: the driver starts Ray
with ``bls.init(spark=..., ray_on_spark_workers=1)`` (``ray.util.spark.setup_ray_cluster``: the head on
this driver, a Ray worker node inside a Spark task on one of the two Spark workers), deploys a model,
queries it from the executor that is left, and prints what it saw as one JSON line.

    python tests/_ray_on_spark_driver.py SPARK_MASTER DRIVER_IP TEMP_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time

import byzerllm_spark as bls

ROWS = 2000


def main() -> None:
    import ray
    from pyspark.sql import SparkSession

    master, driver_ip, temp_dir = sys.argv[1:4]
    token = "ray-on-spark-test-token-0123456789"
    seen: dict = {"seconds": {}}
    start = time.monotonic()

    def lap(stage: str) -> None:
        seen["seconds"][stage] = round(time.monotonic() - start, 1)
    spark = (SparkSession.builder.master(master).appName("byzerllm-ray-on-spark-test")
             .config("spark.driver.host", driver_ip).config("spark.ui.enabled", "false")
             .config("spark.executor.memory", "768m").config("spark.executor.cores", "1")
             .config("spark.executorEnv.BYZERLLM_AUTH_TOKEN", token)
             # Ray on Spark starts its nodes with the `ray` command on the executors' PATH.
             .config("spark.executorEnv.PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    lap("spark")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() < 3:
        time.sleep(1)
    info = bls.init(spark=spark, ray_on_spark_workers=1, http_host="0.0.0.0", auth_token=token,
                    ray_on_spark_options={"num_cpus_worker_node": 1, "num_gpus_worker_node": 0,
                                          "ray_temp_root_dir": temp_dir})
    lap("init")
    seen["embedded"] = info.embedded
    seen["ray_head"] = info.ray_address.rsplit(":", 1)[0].split("//")[-1]
    nodes = [n for n in ray.nodes() if n["Alive"]]
    seen["ray_nodes"] = len(nodes)
    seen["worker_node_cpus"] = sorted(n["Resources"].get("CPU", 0) for n in nodes)
    bls.deploy("ros_echo", pretrained_model_type="custom/echo", cpus_per_worker=0.5)
    lap("deploy")
    seen["worker_nodes"] = [w["node_ip"] for w in bls.workers("ros_echo")]
    bls.register_model_function(spark, "ros_echo", udf_name="chat", batch_size=200)
    try:
        rows = spark.sql(f"SELECT id, chat(llm_param(map('instruction', cast(id AS STRING)))) AS a "
                         f"FROM range(0, {ROWS}, 1, 2)").collect()
        seen["error"] = None
    except Exception as exc:  # reported to the test
        rows, seen["error"] = [], f"{type(exc).__name__}: {exc}"[-4000:]
    lap("query")
    seen["rows"] = len(rows)
    seen["ids_once"] = sorted(r.id for r in rows) == list(range(ROWS))
    seen["all_right"] = all(r.a == str(r.id) for r in rows)
    seen["stat_requests"] = sum(bls.stat("ros_echo")["total_requests"])
    bls.undeploy("ros_echo")
    bls.shutdown()  # stops the Ray cluster on Spark too
    seen["ray_after_shutdown"] = ray.is_initialized()
    lap("shutdown")
    spark.stop()
    print("RESULT " + json.dumps(seen), flush=True)


if __name__ == "__main__":
    main()
