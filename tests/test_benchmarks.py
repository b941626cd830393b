"""Benchmarks cannot break unseen: every bench runs once at smoke sizes (``run_all.py --smoke``, all in
one process: about two minutes on 2 quiet cores) and fails when a figure or baseline is zero, nan or
infinite; the check itself is tested first, and so is the one-process-per-bench path of a full run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from byzerllm_spark import settings

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _common():
    sys.path.insert(0, BENCH_DIR)
    try:
        import _common
    finally:
        sys.path.remove(BENCH_DIR)
    return _common


def test_bad_figures_names_zero_nan_and_infinite():
    common = _common()
    results = [
        {"title": "fine", "figure": 2.0, "baseline": 1.0, "ratio": 2.0},
        {"title": "no baseline", "figure": 3.0, "baseline": None, "ratio": None},
        {"title": "zero baseline", "figure": 37.5, "baseline": 0.0, "ratio": float("nan")},
        {"title": "infinite", "figure": float("inf"), "baseline": 1.0, "ratio": float("inf")},
    ]
    problems = common.bad_figures(results)
    assert any(p.startswith("zero baseline: baseline is 0.0") for p in problems)
    assert any(p.startswith("infinite: figure is inf") for p in problems)
    assert not any(p.startswith(("fine", "no baseline")) for p in problems)


def test_finish_exits_non_zero_naming_the_figure(tmp_path, monkeypatch, capsys):
    common = _common()
    monkeypatch.setattr(common, "RESULTS", [])
    monkeypatch.setenv(common.RESULTS_ENV, str(tmp_path / "r.jsonl"))
    common.report("tokens/s", 37.5, 0.0, "tokens/s")
    with pytest.raises(SystemExit) as exc:
        common.finish("bench_x")
    assert exc.value.code == 1
    assert "tokens/s: baseline is 0.0" in capsys.readouterr().err
    (line,) = (tmp_path / "r.jsonl").read_text().splitlines()
    assert json.loads(line)["bench"] == "bench_x"
    monkeypatch.setattr(common, "RESULTS", [])
    with pytest.raises(SystemExit):
        common.finish("bench_empty")  # a bench that recorded nothing fails too
    assert "no figure was recorded" in capsys.readouterr().err


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", settings.CACHE_DIR_ENV)}
    env.update({settings.HOME_ENV: str(tmp_path / "home"), "PYSPARK_PYTHON": sys.executable})
    return env


def test_a_full_run_runs_each_bench_as_its_own_script(tmp_path, monkeypatch):
    # The path of a full-size run (a process per bench, figures through $BENCH_RESULTS), taken with the
    # one bench that needs neither Ray nor Spark, at smoke size.
    sys.path.insert(0, BENCH_DIR)
    try:
        import run_all
    finally:
        sys.path.remove(BENCH_DIR)
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    entry = run_all.run_bench("model_table", smoke=True, timeout=300)
    assert entry["ok"], entry.get("error")
    assert {f["bench"] for f in entry["figures"]} == {"bench_model_table"} and len(entry["figures"]) == 5
    assert entry["command"] == "benchmarks/bench_model_table.py --smoke" and entry["machine"]["cpus"]


@pytest.mark.slow
def test_every_benchmark_smoke(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "run_all.py"), "--smoke", "--out", str(out)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["benches"]
    assert set(results) == {"serving", "spark", "jvm_bridge", "saas", "finetune", "model_table", "cache",
                            "structured", "lora"}
    for name, entry in results.items():
        assert entry["ok"] and entry["figures"], name
        assert not _common().bad_figures(entry["figures"]), name
    counts = {name: len(entry["figures"]) for name, entry in results.items()}
    assert counts == {"serving": 7, "spark": 3, "jvm_bridge": 2, "saas": 4, "finetune": 3, "model_table": 5,
                      "cache": 1, "structured": 4, "lora": 1}, counts
    assert "| figure |" in (out / "results.md").read_text()
