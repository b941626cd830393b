"""Requests/s of a ``saas/openai`` deployment against a local OpenAI-compatible server.

The upstream (``tests/_fake_openai.py``, aiohttp, its own process) answers every chat request after
a fixed ``--latency-ms`` (50). A SaaS worker sends one upstream request at a time (as in Byzer-LLM), so
``--workers`` (4) workers can do at most ``workers / latency`` = 80 requests/s: the ideal. Measured,
``--repeat`` times each (median reported), with every row one upstream request:

* ``direct``: the upstream alone, ``workers`` concurrent aiohttp callers (the ceiling of the upstream)
* ``client``: ``bls.chat_batch`` batches of ``--batch-size`` rows from ``2 x workers`` threads
  (the Arrow route, as Spark uses it)
* ``openai``: single-row ``/v1/chat/completions`` calls with the ``openai`` client from
  ``2 x workers`` threads (proxy → /v1 app → handle → worker → upstream)
* ``spark``: ``SELECT bench(llm_param(map('instruction', q))) FROM t`` over ``--rows`` rows in a
  ``local[2]`` SparkSession (started and warmed up outside the timing)

Usage::

    .venv/bin/python benchmarks/bench_saas.py                       # 4 workers, 50 ms, 800 rows, 3 repeats
    .venv/bin/python benchmarks/bench_saas.py --modes client,openai --repeat 1
    .venv/bin/python benchmarks/bench_saas.py --smoke                # 1 worker, 16 rows: every figure finite and > 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers: this interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import add_smoke_flag, deployment, main_on_ray, report, spark_session  # noqa: E402


def start_upstream(latency_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "_fake_openai.py"), "--port", "0", "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE, text=True,
    )
    port = int(proc.stdout.readline().strip())
    return proc, f"http://127.0.0.1:{port}/v1"


def bench_direct(base_url: str, rows: int, concurrency: int) -> float:
    import aiohttp

    async def run() -> float:
        queue = list(range(rows))
        async with aiohttp.ClientSession() as session:
            async def caller() -> None:
                while queue:
                    i = queue.pop()
                    body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
                    async with session.post(f"{base_url}/chat/completions", json=body) as resp:
                        await resp.read()

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            return rows / (time.perf_counter() - started)

    return asyncio.run(run())


def bench_client(model: str, rows: int, batch_size: int, threads: int) -> float:
    import byzerllm_spark as bls

    batches = [[f"q{i}" for i in range(start, min(rows, start + batch_size))] for start in range(0, rows, batch_size)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        answers = [a for batch in pool.map(lambda b: bls.chat_batch(model, b, raise_on_error=True), batches) for a in batch]
    elapsed = time.perf_counter() - started
    assert answers == [f"re: q{i}" for i in range(rows)]
    return rows / elapsed


def bench_openai(endpoint: str, model: str, rows: int, threads: int) -> float:
    import openai

    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused", max_retries=0)

    def one(i: int) -> str:
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"q{i}"}])
        return out.choices[0].message.content

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(one, range(rows)))
    elapsed = time.perf_counter() - started
    assert answers == [f"re: q{i}" for i in range(rows)]
    return rows / elapsed


def bench_spark(spark, model: str, rows: int) -> float:
    spark.range(rows).selectExpr("concat('q', id) AS q").createOrReplaceTempView("bench_qs")
    started = time.perf_counter()
    answers = spark.sql(f"SELECT {model}(llm_param(map('instruction', q))) AS a FROM bench_qs").collect()
    elapsed = time.perf_counter() - started
    assert len(answers) == rows and all(r.a.startswith("re: q") for r in answers)
    return rows / elapsed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default="direct,client,openai,spark")
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.rows, args.repeat = 1, 16, 1
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    """Every figure, on the cluster ``bls.init()`` started; the ``spark`` mode uses ``spark`` (default: a
    local session of its own, stopped at the end)."""
    import byzerllm_spark as bls

    modes = args.modes.split(",")
    ideal = args.workers / (args.latency_ms / 1000)
    upstream, base_url = start_upstream(args.latency_ms)
    results: dict[str, list[float]] = {m: [] for m in modes}
    own_spark = spark is None and "spark" in modes
    try:
        with deployment("bench_saas", pretrained_model_type="saas/openai", num_workers=args.workers,
                        infer_params={"saas.base_url": base_url, "saas.model": "fake", "saas.api_key": "sk-bench"}):
            bls.chat_batch("bench_saas", [f"warm{i}" for i in range(2 * args.workers)])
            if "spark" in modes:
                spark = spark_session("bench-saas") if own_spark else spark
                bls.register_model_function(spark, "bench_saas")
                bench_spark(spark, "bench_saas", 16)  # JVM, Python workers and UDF warm
            for rep in range(args.repeat):
                for mode in modes:
                    if mode == "direct":
                        value = bench_direct(base_url, args.rows, args.workers)
                    elif mode == "client":
                        value = bench_client("bench_saas", args.rows, args.batch_size, 2 * args.workers)
                    elif mode == "openai":
                        value = bench_openai(bls.endpoint(), "bench_saas", args.rows // 2, 2 * args.workers)
                    elif mode == "spark":
                        value = bench_spark(spark, "bench_saas", args.rows)
                    else:
                        raise SystemExit(f"unknown mode {mode!r}")
                    results[mode].append(value)
                    print(f"  run {rep + 1} {mode:7s} {value:7.1f} req/s", flush=True)
            stat = bls.stat("bench_saas")
    finally:
        if own_spark and spark is not None:
            spark.stop()
        upstream.terminate()
        upstream.wait(10)

    print(f"\nsaas/openai, {args.workers} workers, upstream latency {args.latency_ms:g} ms, {os.cpu_count()} CPUs; "
          f"ideal {ideal:.0f} req/s; medians of {args.repeat}")
    print(f"{'path':8s} {'req/s':>7s} {'of ideal':>9s}")
    for mode, values in results.items():
        median = statistics.median(values)
        print(f"{mode:8s} {median:7.1f} {median / ideal:9.2f}")
        report(f"saas/openai {mode}, {args.workers} workers, {args.latency_ms:g} ms upstream (median of {args.repeat})",
               median, ideal, "req/s", "of ideal; >= 0.9 for client/openai/spark")
    print(f"requests per worker: {stat['total_requests']}; tokens: prompt {stat['total_prompt_tokens']}, "
          f"completion {stat['total_completion_tokens']}")


def main() -> None:
    main_on_ray("bench_saas", parse_args, run)


if __name__ == "__main__":
    main()
