"""Echo rows/s of the same SQL from ``spark-sql`` with the JVM bridge and from PySpark (same run).

``SELECT count(chat(llm_param(map('instruction', s)))) FROM (SELECT CAST(id AS STRING) AS s FROM
range(--rows))`` (200,000) against the echo plugin (``--workers`` 2 workers), which answers in
microseconds, so the figure is the Spark-to-Serve path alone. The bridge runs it in a ``spark-sql``
process (``local[2]``, the jar of ``jvm-bridge/build.sh``) and the figure is Spark's "Time taken" of the
query after a warm-up query in the same process; the baseline is the same SQL in a PySpark session
(``local[2]``, ``bls.register_model_function``), also after a warm-up. Both use the functions' default
sizing (the echo plugin's preferred 5,000 rows per request). Target: ratio >= 1.0.

Usage::

    .venv/bin/python benchmarks/bench_jvm_bridge.py              # 200,000 rows, best of 3 runs each
    .venv/bin/python benchmarks/bench_jvm_bridge.py --smoke      # 2,000 rows: every figure finite and > 0
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers: this interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import add_smoke_flag, deployment, main_on_ray, report, spark_session  # noqa: E402

MODEL = "bench_bridge"
JAR = os.path.join(ROOT, "jvm-bridge", "target", "byzerllm-spark-bridge.jar")


def sql(rows: int) -> str:
    return f"SELECT count(chat(llm_param(map('instruction', s)))) FROM (SELECT CAST(id AS STRING) AS s FROM range({rows}))"


def bridge_seconds(endpoint: str, rows: int, repeat: int) -> list[float]:
    """Spark's "Time taken" of each timed query in one spark-sql process (after a warm-up query)."""
    import pyspark

    subprocess.run(["bash", os.path.join(ROOT, "jvm-bridge", "build.sh"), sys.executable], check=True)
    work = tempfile.mkdtemp(prefix="bench-jvm-bridge-")
    try:
        script = os.path.join(work, "bench.sql")
        with open(script, "w") as f:
            f.write(";\n".join([sql(1000)] + [sql(rows)] * repeat) + ";\n")
        home = os.path.dirname(pyspark.__file__)
        conf = {"spark.sql.extensions": "tech.byzer.llm.spark.ByzerLLMExtensions", "spark.byzerllm.endpoint": endpoint,
                "spark.ui.enabled": "false", "spark.sql.warehouse.dir": os.path.join(work, "warehouse"),
                "spark.driver.extraJavaOptions": f"-Dderby.system.home={work}", "spark.driver.memory": "2g"}
        cmd = [os.path.join(home, "bin", "spark-sql"), "--master", "local[2]", "--jars", JAR, "-f", script]
        for key, value in conf.items():
            cmd[1:1] = ["--conf", f"{key}={value}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_"))}
        result = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
        if result.returncode != 0:
            raise RuntimeError(f"spark-sql failed: {result.stdout[-2000:]}{result.stderr[-3000:]}")
        counts = [line.strip() for line in result.stdout.splitlines() if line.strip().isdigit()]
        assert counts == ["1000"] + [str(rows)] * repeat, counts
        taken = [float(t) for t in re.findall(r"Time taken: ([0-9.]+) seconds", result.stderr + result.stdout)]
        assert len(taken) == repeat + 1, taken
        return taken[1:]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pyspark_seconds(spark, rows: int, repeat: int) -> list[float]:
    import byzerllm_spark as bls

    bls.register_model_function(spark, MODEL, udf_name="chat")
    assert spark.sql(sql(1000)).collect()[0][0] == 1000
    out = []
    for _ in range(repeat):
        started = time.perf_counter()
        count = spark.sql(sql(rows)).collect()[0][0]
        out.append(time.perf_counter() - started)
        assert count == rows
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each path (the best counts)")
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.repeat = 2000, 1
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    import byzerllm_spark as bls

    own_spark = spark is None
    # udf_name: the SQL function both paths call is `chat` (the bridge reads it from the worker's info).
    with deployment(MODEL, pretrained_model_type="custom/echo", num_workers=args.workers, cpus_per_worker=0.1,
                    udf_name="chat"):
        # The bridge first, alone: the PySpark session's JVM is started after it, so neither competes.
        jvm = bridge_seconds(bls.endpoint(), args.rows, args.repeat)
        spark = spark_session("bench-jvm-bridge") if own_spark else spark
        try:
            py = pyspark_seconds(spark, args.rows, args.repeat)
        finally:
            if own_spark:
                spark.stop()
    jvm_rate, py_rate = args.rows / min(jvm), args.rows / min(py)
    print(f"  spark-sql + bridge  {[round(s, 2) for s in jvm]} s -> {jvm_rate:,.0f} rows/s")
    print(f"  PySpark             {[round(s, 2) for s in py]} s -> {py_rate:,.0f} rows/s")
    report(f"echo rows/s of a {args.rows:,}-row SQL count from spark-sql with the JVM bridge (vs PySpark)",
           jvm_rate, py_rate, "rows/s", ">= 1.0 of the PySpark path")


def main() -> None:
    main_on_ray("bench_jvm_bridge", parse_args, run)


if __name__ == "__main__":
    main()
