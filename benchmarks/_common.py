"""Shared helpers for the benchmarks: timing, recording figures against a baseline, and the check
that keeps a benchmark from breaking unseen.

Every figure goes through :func:`report` (figure and baseline measured in the same run) or
:func:`measured` (a figure without a baseline); :func:`finish` then fails the run, naming the
figure, when any figure or baseline is zero, negative, nan or infinite, or when none was recorded.
With ``$BENCH_RESULTS`` set it also appends the figures to that JSON-lines file
(``benchmarks/run_all.py`` collects them into ``results.json`` / ``results.md``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers: this interpreter
# transformers' "Loading weights" and "Writing model shards" bars (in-process baselines, made models) are no figure.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

RESULTS_ENV = "BENCH_RESULTS"
#: The figures this process recorded, in order (dicts: title, figure, unit, baseline, ratio, target).
RESULTS: list[dict] = []
#: None: :func:`deployment` deploys and removes. ``run_all.py --smoke`` sets a dict (name -> deploy
#: arguments): deployments then stay up, and a later bench asking for the same name and arguments
#: reuses the worker. Starting and removing a worker costs 10-20 s on 2 cores, and the smoke run
#: would otherwise pay it a dozen times.
KEPT: dict[str, dict] | None = None


@contextmanager
def timer(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start


def spark_session(app: str = "bench", driver_memory: str = "2g"):
    """The benches' local SparkSession (``local[2]``, UI off); an active one is returned as it is, which is
    how ``run_all.py --smoke`` gives every bench the same session."""
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName(app).config("spark.ui.enabled", "false")
             .config("spark.driver.memory", driver_memory).config("spark.sql.shuffle.partitions", "2").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


@contextmanager
def deployment(name: str, **kwargs):
    """``bls.deploy(name, **kwargs)`` for the block, ``bls.undeploy(name)`` after it (kept for reuse when
    :data:`KEPT` is a dict: see there). A figure that times the deploy itself calls ``bls.deploy``."""
    import byzerllm_spark as bls

    if KEPT is None or KEPT.get(name) != kwargs or not bls.exists(name):
        if bls.exists(name):
            bls.undeploy(name)
        bls.deploy(name, **kwargs)
    try:
        yield name
    finally:
        if KEPT is None:
            bls.undeploy(name)
        else:
            KEPT[name] = kwargs


def add_smoke_flag(parser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes: checks that every figure comes out finite and > 0 (CI), not the targets")


def report(title: str, figure: float, baseline: float, unit: str, target: str = "") -> None:
    """Print and record ``figure`` against ``baseline`` (same unit, same run)."""
    ratio = figure / baseline if baseline else float("nan")
    line = f"{title}: {figure:,.1f} {unit} vs baseline {baseline:,.1f} {unit} -> ratio {ratio:.2f}"
    if target:
        line += f" (target: {target})"
    print(line, flush=True)
    RESULTS.append({"title": title, "figure": figure, "unit": unit, "baseline": baseline, "ratio": ratio,
                    "target": target})


def measured(title: str, figure: float, unit: str, target: str = "", note: str = "") -> None:
    """Print and record a figure that has no baseline (e.g. seconds to the first answer)."""
    print(f"{title}: {figure:,.2f} {unit}" + (f" ({note})" if note else "") + (f" (target: {target})" if target else ""),
          flush=True)
    RESULTS.append({"title": title, "figure": figure, "unit": unit, "baseline": None, "ratio": None,
                    "target": target, "note": note})


def bad_figures(results: list[dict]) -> list[str]:
    """The problems of ``results``: each figure or baseline that is not a finite number > 0, by title."""
    problems = []
    for r in results:
        for key in ("figure", "baseline", "ratio"):
            value = r.get(key)
            if value is None and key != "figure":
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                problems.append(f"{r['title']}: {key} is {value!r} (expected a finite number > 0)")
    return problems


def problems_of(bench: str, results: list[dict]) -> list[str]:
    """What is wrong with a bench's ``results``: :func:`bad_figures`, or that it recorded none."""
    return bad_figures(results) if results else [f"{bench}: no figure was recorded"]


def main_on_ray(bench: str, parse_args: Callable, run: Callable) -> None:
    """A bench script's ``main()``: an embedded Ray and Serve around ``run(parse_args())``, then
    :func:`finish` (the benches whose ``run`` needs neither Spark nor set-up of their own)."""
    import byzerllm_spark as bls

    args = parse_args()
    bls.init(http_port=0, include_dashboard=False)
    try:
        run(args)
    finally:
        bls.shutdown()
    finish(bench)


def finish(bench: str) -> None:
    """End of a benchmark run: record the figures for run_all, and exit 1 naming every bad one."""
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as f:
            for r in RESULTS:
                f.write(json.dumps({"bench": bench, **r}) + "\n")
    problems = problems_of(bench, RESULTS)
    if problems:
        print(f"\nFAILED {bench}: " + "; ".join(problems), file=sys.stderr, flush=True)
        raise SystemExit(1)
    print(f"{bench}: {len(RESULTS)} figures, all finite and > 0", flush=True)


def run_in_threads(work: Callable, count: int) -> float:
    """The in-process baselines: ``work(k, loop)`` in ``count`` threads, each with its own event
    loop (one per backend instance, as each Serve replica has); returns the wall seconds."""

    def drive(k: int) -> None:
        loop = asyncio.new_event_loop()
        try:
            work(k, loop)
        finally:
            loop.close()

    threads = [threading.Thread(target=drive, args=(k,)) for k in range(count)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start
