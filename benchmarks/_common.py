"""Shared helpers for the benchmarks: timing and printing ratios against a baseline."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers: this interpreter


@contextmanager
def timer(out: dict, key: str):
    start = time.perf_counter()
    yield
    out[key] = time.perf_counter() - start


def report(title: str, figure: float, baseline: float, unit: str, target: str = "") -> None:
    ratio = figure / baseline if baseline else float("nan")
    line = f"{title}: {figure:,.1f} {unit} vs baseline {baseline:,.1f} {unit} -> ratio {ratio:.2f}"
    if target:
        line += f" (target: {target})"
    print(line, flush=True)


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
