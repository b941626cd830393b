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

RESULTS_ENV = "BENCH_RESULTS"
#: The figures this process recorded, in order (dicts: title, figure, unit, baseline, ratio, target).
RESULTS: list[dict] = []


@contextmanager
def timer(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start


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


def finish(bench: str) -> None:
    """End of a benchmark run: record the figures for run_all, and exit 1 naming every bad one."""
    path = os.environ.get(RESULTS_ENV)
    if path:
        with open(path, "a") as f:
            for r in RESULTS:
                f.write(json.dumps({"bench": bench, **r}) + "\n")
    problems = bad_figures(RESULTS) if RESULTS else [f"{bench}: no figure was recorded"]
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
