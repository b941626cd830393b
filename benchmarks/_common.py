"""Shared helpers for the benchmarks: timing and printing ratios against a baseline."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

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
