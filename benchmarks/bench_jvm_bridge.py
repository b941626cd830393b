"""Echo rows/s of the same SQL from ``spark-sql`` with the JVM bridge and from PySpark (same run).

``SELECT count(bench_echo(llm_param(map('instruction', s)))) FROM (SELECT CAST(id AS STRING) AS s FROM
range(--rows)))`` (200,000) against the echo plugin, which answers in microseconds, so the figure is the
Spark-to-Serve path alone. The deployment is ``bench_spark``'s echo (``run_all.py --smoke`` reuses its
worker). The bridge runs the SQL in one ``spark-sql`` process (``local[2]``, the jar of
``jvm-bridge/build.sh``) fed one query at a time over its standard input, and its time is Spark's "Time
taken"; the baseline is the same SQL in a PySpark session (``local[2]``, ``bls.register_model_function``),
timed around ``collect()``. Both use the functions' default sizing (the echo plugin's preferred 5,000 rows
per request, the same requests in flight per task) and the same 2 partitions (``range`` over ``local[2]``).

The two paths take turns (bridge, PySpark, PySpark, bridge, ...) after one warm-up query each, so a change
in the machine's load falls on both alike (on 2 shared cores the load moves the figures by 2x within a
minute; measured one path after the other, the order decided the ratio). Best of ``--repeat`` each.
Target: ratio >= 1.0.

A second figure, the client's CPU seconds per 100,000 rows (the ``spark-sql`` JVM against the PySpark
session's JVM and its Python workers; the Serve processes are not counted), shows the cost of each path
apart from the load: lower is better.

Usage::

    .venv/bin/python benchmarks/bench_jvm_bridge.py              # 200,000 rows, best of 5 runs each
    .venv/bin/python benchmarks/bench_jvm_bridge.py --smoke      # 2,000 rows: every figure finite and > 0
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers: this interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import add_smoke_flag, deployment, main_on_ray, report, spark_session  # noqa: E402

MODEL = "bench_echo"  # bench_spark's echo deployment; its SQL function has the model's name on both paths
JAR = os.path.join(ROOT, "jvm-bridge", "target", "byzerllm-spark-bridge.jar")
#: Rows of the untimed first query of each path: enough requests for the JVM's JIT to compile the
#: operator's loops (after 1,000 rows the first timed query spent 3-4x as long building requests).
WARM_ROWS = 20_000


def sql(rows: int) -> str:
    return f"SELECT count({MODEL}(llm_param(map('instruction', s)))) FROM (SELECT CAST(id AS STRING) AS s FROM range({rows}))"


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


class SparkSqlShell:
    """One ``spark-sql`` process with the bridge, fed one query at a time over its standard input.

    :meth:`query` returns Spark's "Time taken" of the query in seconds and the query's output lines; a
    query that fails (no result) raises ``RuntimeError`` with the end of spark-sql's log.
    """

    def __init__(self, endpoint: str, work: str) -> None:
        import pyspark

        home = os.path.dirname(pyspark.__file__)
        conf = {"spark.sql.extensions": "tech.byzer.llm.spark.ByzerLLMExtensions", "spark.byzerllm.endpoint": endpoint,
                "spark.ui.enabled": "false", "spark.sql.warehouse.dir": os.path.join(work, "warehouse"),
                "spark.driver.extraJavaOptions": f"-Dderby.system.home={work}", "spark.driver.memory": "2g",
                # No Hive metastore: the SQL reads no tables, and Derby's start was 25 of the shell's 35 s
                # (10 s in memory) at load 20.
                "spark.sql.catalogImplementation": "in-memory"}
        cmd = [os.path.join(home, "bin", "spark-sql"), "--master", "local[2]", "--jars", JAR]
        for key, value in conf.items():
            cmd += ["--conf", f"{key}={value}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_"))}
        self.proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.taken: list[float] = []
        self.log: list[str] = []
        self.count = 0
        self.timed = 0  # "Time taken" lines of the statements answered so far (each query and its marker)
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        self.query("SELECT 1", timeout=600)  # started: the JVM's start is not in the first query's CPU

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"Time taken: ([0-9.]+) seconds", line)
            if found:
                self.taken.append(float(found.group(1)))

    def _failed(self, why: str) -> RuntimeError:
        return RuntimeError(f"spark-sql {why}: {''.join(self.log[-40:])[-3000:]}")

    def query(self, text: str, timeout: float = 1800) -> tuple[float, list[str]]:
        # A marker query after each one: its answer on stdout says the query before it is done, failed or not.
        self.count += 1
        marker = f"bench-done-{self.count}"
        before = self.timed
        self.proc.stdin.write(f"{text};\nSELECT '{marker}';\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise self._failed(f"gave no answer in {timeout} s") from None
            if line is None:
                raise self._failed(f"exited with {self.proc.wait()}")
            if line.strip() == marker:
                break
            out.append(line.strip())
        # The shell echoes each statement after its prompt (wrapped at 80 columns): the answer is what lies
        # between the end of the query's echo and the marker's.
        out = out[:-1] if out and out[-1].startswith("spark-sql") else out
        ends = [i for i, line in enumerate(out) if line.endswith(";")]
        out = [line for line in out[ends[-1] + 1 if ends else 0:] if line]
        # Both statements' "Time taken" lines are on stderr, read by the other thread (a failed query has none).
        wait = time.monotonic() + 60
        while len(self.taken) < before + 2 and time.monotonic() < wait:
            time.sleep(0.01)
        if len(self.taken) < before + 2:
            raise self._failed(f"did not run {text[:200]!r}")
        self.timed = before + 2
        return self.taken[before], out

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)  # the session this bench made for it
                self.proc.wait(10)


def bridge_query(shell: SparkSqlShell, rows: int) -> tuple[float, float]:
    """(seconds, client CPU seconds) of the SQL over ``rows`` from spark-sql."""
    cpu = shell.cpu_seconds()
    seconds, out = shell.query(sql(rows))
    cpu = shell.cpu_seconds() - cpu
    if out != [str(rows)]:
        raise RuntimeError(f"spark-sql answered {out} for a count of {rows} rows")
    return seconds, cpu


def pyspark_query(spark, rows: int) -> tuple[float, float]:
    """(seconds, client CPU seconds: the session's JVM and its Python workers) of the SQL over ``rows``."""
    jvm = spark.sparkContext._gateway.proc.pid  # a local session: the JVM that PySpark started
    cpu = tree_cpu_seconds(jvm)
    started = time.perf_counter()
    count = spark.sql(sql(rows)).collect()[0][0]
    seconds = time.perf_counter() - started
    cpu = tree_cpu_seconds(jvm) - cpu
    if count != rows:
        raise RuntimeError(f"PySpark answered {count} for a count of {rows} rows")
    return seconds, cpu


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each path, taking turns (the best counts)")
    parser.add_argument("--warm-rows", type=int, default=WARM_ROWS, help="rows of each path's untimed first query (0: none)")
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:  # bench_spark's smoke deployment (1 worker): run_all.py --smoke reuses it
        args.rows, args.repeat, args.workers, args.warm_rows = 2000, 1, 1, 0
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    import byzerllm_spark as bls

    subprocess.run(["bash", os.path.join(ROOT, "jvm-bridge", "build.sh"), sys.executable], check=True)
    own_spark = spark is None
    work = tempfile.mkdtemp(prefix="bench-jvm-bridge-")
    shell = None
    # bench_spark's echo deployment: the same arguments, so run_all.py --smoke reuses its worker.
    with deployment(MODEL, pretrained_model_type="custom/echo", num_workers=args.workers, cpus_per_worker=0.5,
                    worker_concurrency=2):
        try:
            shell = SparkSqlShell(bls.endpoint(), work)  # reads the deployed models' functions at start
            spark = spark_session("bench-jvm-bridge") if own_spark else spark
            bls.register_model_function(spark, MODEL)
            if args.warm_rows:
                bridge_query(shell, args.warm_rows)
                pyspark_query(spark, args.warm_rows)
            runs: dict[str, list[tuple[float, float]]] = {"bridge": [], "pyspark": []}
            for i in range(args.repeat):
                turns = [("bridge", lambda: bridge_query(shell, args.rows)), ("pyspark", lambda: pyspark_query(spark, args.rows))]
                for name, measure in turns if i % 2 == 0 else turns[::-1]:
                    runs[name].append(measure())
                    print(f"  {name:8} {runs[name][-1][0]:6.2f} s, client CPU {runs[name][-1][1]:5.2f} s "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            if shell is not None:
                shell.close()
            if own_spark and spark is not None:
                spark.stop()
            shutil.rmtree(work, ignore_errors=True)
    jvm_rate = args.rows / min(s for s, _ in runs["bridge"])
    py_rate = args.rows / min(s for s, _ in runs["pyspark"])
    per = 100_000 / args.rows
    report(f"echo rows/s of a {args.rows:,}-row SQL count from spark-sql with the JVM bridge (vs PySpark, taking turns)",
           jvm_rate, py_rate, "rows/s", ">= 1.0 of the PySpark path")
    report("client CPU seconds per 100,000 rows: the spark-sql JVM (vs the PySpark JVM and Python workers)",
           min(c for _, c in runs["bridge"]) * per, min(c for _, c in runs["pyspark"]) * per, "CPU s",
           "lower is better")


def main() -> None:
    main_on_ray("bench_jvm_bridge", parse_args, run)


if __name__ == "__main__":
    main()
