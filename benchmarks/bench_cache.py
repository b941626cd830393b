"""Seconds of a Spark SQL query re-run with the response cache, against its first run (same run).

A ``saas/openai`` deployment with ``cache=True`` (the diskcache folder of this node) in front of a local
OpenAI-compatible server (``tests/_fake_openai.py``, its own process) that answers each chat request after
``--latency-ms`` (200: a quick answer of a real vendor takes longer). ``SELECT bench_cache(llm_param(map(
'instruction', q, 'temperature', '0'))) FROM t`` over ``--rows`` (10,000) rows of new questions, then the
same query again: the first run sends every row upstream (``--workers`` x ``--worker-concurrency`` calls
in flight), the re-run none (checked: the workers' ``cache_hits`` rise by ``--rows``). The figure is the
re-run's seconds; the baseline the first run's; the ratio their quotient (target: <= 0.05, 20x faster).

Usage::

    .venv/bin/python benchmarks/bench_cache.py                  # 10,000 rows, 200 ms upstream, 4 x 8 in flight
    .venv/bin/python benchmarks/bench_cache.py --rows 2000      # a quicker look
    .venv/bin/python benchmarks/bench_cache.py --smoke          # 64 rows: every figure finite and > 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers: this interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import add_smoke_flag, deployment, main_on_ray, report, spark_session  # noqa: E402
from bench_saas import start_upstream  # noqa: E402

MODEL = "bench_cache"


def timed_query(spark, rows: int, tag: str) -> float:
    sql = (f"SELECT q, {MODEL}(llm_param(map('instruction', q, 'temperature', '0'))) AS a "
           f"FROM (SELECT concat('{tag}-', id) AS q FROM range({rows}))")
    started = time.perf_counter()
    answers = spark.sql(sql).collect()
    elapsed = time.perf_counter() - started
    assert len(answers) == rows and all(r.a == f"re: {r.q}" for r in answers)
    return elapsed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--worker-concurrency", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per request of the Spark function")
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.latency_ms, args.workers, args.worker_concurrency = 64, 5.0, 1, 2
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    """The figure, on the cluster ``bls.init()`` started, with ``spark`` (default: a local session of its own)."""
    import byzerllm_spark as bls

    upstream, base_url = start_upstream(args.latency_ms)
    own_spark = spark is None
    tag = uuid.uuid4().hex[:8]  # questions no earlier run has cached
    try:
        with deployment(MODEL, pretrained_model_type="saas/openai", num_workers=args.workers,
                        worker_concurrency=args.worker_concurrency, cache=True,
                        infer_params={"saas.base_url": base_url, "saas.model": "fake", "saas.api_key": "sk-bench"}):
            bls.clear_cache(MODEL)
            spark = spark_session("bench-cache") if own_spark else spark
            bls.register_model_function(spark, MODEL, batch_size=args.batch_size)
            timed_query(spark, 16, f"warm-{tag}")  # JVM, Python workers and UDF warm
            hits = bls.stat(MODEL)["cache_hits"]
            first = timed_query(spark, args.rows, tag)
            print(f"  first run   {first:8.2f} s ({args.rows / first:,.0f} rows/s, every row upstream)", flush=True)
            cached = timed_query(spark, args.rows, tag)
            print(f"  cached run  {cached:8.2f} s ({args.rows / cached:,.0f} rows/s)", flush=True)
            stat = bls.stat(MODEL)
            assert stat["cache_hits"] - hits == args.rows, (stat["cache_hits"], hits)
            bls.clear_cache(MODEL)
    finally:
        if own_spark and spark is not None:
            spark.stop()
        upstream.terminate()
        upstream.wait(10)
    print(f"\nsaas/openai, {args.workers} workers x {args.worker_concurrency} in flight, upstream latency "
          f"{args.latency_ms:g} ms, {args.rows:,} rows, batch_size {args.batch_size}, {os.cpu_count()} CPUs: "
          f"the cached re-run is {first / cached:.1f}x faster")
    report(f"cached re-run of a {args.rows:,}-row SaaS query ({args.latency_ms:g} ms upstream)", cached, first, "s",
           "ratio <= 0.05 (20x faster than the first run)")


def main() -> None:
    main_on_ray("bench_cache", parse_args, run)


if __name__ == "__main__":
    main()
