"""Spark Connect: the SQL functions, the DataFrame API and the data servers from a Connect session.

PySpark 4 starts a local Spark Connect server for ``SparkSession.builder.remote("local[2]")``. A
process holds one kind of session, so the Connect session runs in a child process that joins the
test session's Ray cluster; it prints its findings as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("grpc_status")  # pyspark[connect]'s client needs grpcio-status and zstandard
pytest.importorskip("zstandard")

CHILD = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import byzerllm_spark as bls
    from byzerllm_spark.finetune import data_servers
    from pyspark.sql import SparkSession, functions as F

    bls.init(ray_address=sys.argv[1])
    spark = SparkSession.builder.remote("local[2]").getOrCreate()
    out = {"session": type(spark).__module__}
    try:
        bls.deploy("connect_echo", pretrained_model_type="custom/echo", num_workers=1, cpus_per_worker=0.25,
                   udf_name="chat", spark=spark)
        rows = spark.sql("SELECT s, chat(llm_param(map('instruction', llm_prompt('q {0}', array(s))))) AS a "
                         "FROM (SELECT cast(id AS string) AS s FROM range(2000))").collect()
        out["sql_rows"] = len(rows)
        out["sql_own_answers"] = all(r.a == "q " + r.s for r in rows)
        from byzerllm_spark.functions import llm_param, model_function
        df = spark.range(3).select(F.col("id").cast("string").alias("q"))
        out["dataframe"] = [r.a for r in df.withColumn(
            "a", model_function("connect_echo")(llm_param({"instruction": F.col("q")}))).orderBy("q").collect()]
        out["jvm_batches"] = data_servers._jvm_arrow_batches(spark.range(3), 10) is not None
        ds, servers = bls.to_ray_dataset(spark.range(0, 5000, numPartitions=2).selectExpr("id", "cast(id AS string) s"))
        out["dataset_rows"], out["dataset_partitions"] = ds.count(), servers.partitions
        out["dataset_ids"] = sorted(r["id"] for r in ds.take_all()) == list(range(5000))
        servers.close()
    finally:
        if bls.exists("connect_echo"):
            bls.undeploy("connect_echo")
        spark.stop()
    print("RESULT " + json.dumps(out))
    """
)


def test_functions_and_data_servers_work_from_a_spark_connect_session(cluster):
    import ray

    address = ray.get_runtime_context().gcs_address
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run([sys.executable, "-c", CHILD, address], capture_output=True, text=True, timeout=600,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["session"].startswith("pyspark.sql.connect")
    assert out["sql_rows"] == 2000 and out["sql_own_answers"]
    assert out["dataframe"] == ["0", "1", "2"]
    # Connect has no JVM handle: the push goes through mapInArrow, with the same rows.
    assert out["jvm_batches"] is False
    assert out["dataset_rows"] == 5000 and out["dataset_partitions"] == 2 and out["dataset_ids"]
