"""What a new user hits first, each in a fresh process as the user would run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NO_PYSPARK_PYTHON = r'''
import os, sys
assert "PYSPARK_PYTHON" not in os.environ and "PYSPARK_DRIVER_PYTHON" not in os.environ
# A PATH whose python3 lacks pyarrow: Spark would start its workers with it.
import byzerllm_spark as bls
from pyspark.sql import SparkSession
bls.init(http_port=0)
spark = SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false").getOrCreate()
try:
    bls.deploy("echo_first", pretrained_model_type="custom/echo", cpus_per_worker=0.1, spark=spark, udf_name="chat")
    rows = spark.sql("SELECT chat(llm_param(map('instruction', 'hi'))) AS a").collect()
    print("RESULT", rows[0].a)
finally:
    spark.stop()
    bls.shutdown()
'''


@pytest.mark.slow
def test_spark_udfs_use_the_drivers_python_when_nothing_is_set(tmp_path):
    """Run as `.venv/bin/python job.py` with nothing set: Spark's workers must not start `python3`
    from PATH (here a python3 without pyarrow, as on a machine whose system Python lacks it)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "python3"
    fake.write_text("#!/bin/sh\necho 'No module named pyarrow (the wrong python3)' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "RAY_ADDRESS")}
    env["PATH"] = f"{fake_bin}{os.pathsep}{env.get('PATH', '')}"
    env["BYZERLLM_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([sys.executable, "-c", NO_PYSPARK_PYTHON], capture_output=True, text=True, timeout=400,
                          env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT hi" in proc.stdout
