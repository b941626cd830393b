"""Run every benchmark at full size and write ``benchmarks/results.json`` and ``results.md``.

    .venv/bin/python benchmarks/run_all.py                    # all, full size (an hour or more on 2 cores)
    .venv/bin/python benchmarks/run_all.py --only serving     # some; the others' last results are kept
    .venv/bin/python benchmarks/run_all.py --smoke --out /tmp/x   # tiny sizes, the check CI runs
    .venv/bin/python benchmarks/run_all.py --only finetune --args "finetune=--repeat 1"   # a reduced size

At full size each benchmark runs in its own process (its script, as a user runs it) and records its
figures through ``_common.finish``. With ``--smoke`` they all run in this one process instead, on one
embedded Ray, one SparkSession and one cache folder, each bench's ``run(parse_args([... "--smoke"]),
spark)`` in turn: Ray, Serve, the JVM and torch then start once, not once per bench, which is most of
what a smoke run costs. Either way a bench fails when a figure or baseline is zero, nan or infinite,
or when it recorded none. Every bench's entry carries the date, commit and machine of the run that
produced it, and the README's measured figures are taken from ``results.md``. Exits 1 naming each
bench that failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import shlex
import shutil
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: name -> the script and its full-size arguments (the defaults unless noted).
BENCHES = {
    "serving": ["bench_serving.py"],
    "spark": ["bench_spark.py"],
    "jvm_bridge": ["bench_jvm_bridge.py"],  # after spark: --smoke reuses its echo worker
    "saas": ["bench_saas.py"],
    "finetune": ["bench_finetune.py"],
    "model_table": ["bench_model_table.py"],
    "cache": ["bench_cache.py"],
    "structured": ["bench_structured.py"],
    "lora": ["bench_lora.py"],
}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        mem_gib = None
    try:
        gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        gpu = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gib": mem_gib, "gpu": gpu, "load_average": [round(x, 1) for x in os.getloadavg()]}


def _entry(name: str, command: str, smoke: bool) -> dict:
    print(f"== {name}: {command}", flush=True)
    return {"bench": name, "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "--short", "HEAD") + ("+uncommitted" if _git("status", "--porcelain") else ""),
            "machine": machine(), "smoke": smoke}


def run_bench(name: str, smoke: bool, timeout: float, args: list[str] = ()) -> dict:
    """One bench as its own process: its script, as a user runs it (with ``args`` after its own)."""
    script, *extra = BENCHES[name]
    command = [sys.executable, script, *extra, *args] + (["--smoke"] if smoke else [])
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        sink = f.name
    env = {**os.environ, "BENCH_RESULTS": sink}
    entry = _entry(name, "benchmarks/" + " ".join(command[1:]), smoke)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=HERE, env=env, timeout=timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        rc, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        rc, output = "timeout", (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    entry["seconds"] = round(time.perf_counter() - start, 1)
    with open(sink) as f:
        entry["figures"] = [json.loads(line) for line in f if line.strip()]
    os.unlink(sink)
    entry["ok"] = rc == 0
    if rc != 0:
        entry["error"] = f"exit {rc}: " + output[-2000:]
    print(output, end="", flush=True)
    print(f"== {name}: {'ok' if rc == 0 else 'FAILED (' + str(rc) + ')'} in {entry['seconds']} s", flush=True)
    return entry


def run_in_process(names: list[str]) -> dict[str, dict]:
    """Every bench of ``names`` at smoke sizes in this process, sharing one embedded Ray, one SparkSession,
    one fresh cache folder and the deployments that two benches ask for alike (``_common.KEPT``).
    ``serving`` runs first, so its first transformers deploy is a cold one."""
    sys.path.insert(0, HERE)
    import _common

    from byzerllm_spark import settings

    cache = tempfile.mkdtemp(prefix="bench-smoke-cache-")
    os.environ[settings.CACHE_DIR_ENV] = cache  # before init: Ray's workers inherit it
    import byzerllm_spark as bls

    _common.KEPT = {}  # deployments stay up for a later bench that asks for the same one
    start = time.perf_counter()
    # Logical CPUs: the deployments kept for reuse hold theirs while idle, and later ones (the SFT task
    # takes 2) must still be placed. The benches run in turn, so the cores are not oversubscribed.
    bls.init(http_port=0, include_dashboard=False, num_cpus=max(8, os.cpu_count() or 1))
    spark = _common.spark_session("bench-smoke")
    print(f"== Ray, Serve and Spark started in {time.perf_counter() - start:.1f} s", flush=True)
    entries: dict[str, dict] = {}
    try:
        for name in names:
            script, *extra = BENCHES[name]
            module = importlib.import_module(script[: -len(".py")])
            entry = _entry(name, f"benchmarks/{script} {' '.join(extra + ['--smoke'])} (in run_all.py's process)",
                           smoke=True)
            _common.RESULTS.clear()
            start = time.perf_counter()
            try:
                module.run(module.parse_args([*extra, "--smoke"]), spark)
                problems = _common.problems_of(f"bench_{name}", _common.RESULTS)
            except (Exception, SystemExit):
                problems = [traceback.format_exc()[-2000:]]
            if problems:  # what a failed bench left deployed would hold its CPUs
                for model in bls.list_models():
                    bls.undeploy(model)
            entry["seconds"] = round(time.perf_counter() - start, 1)
            entry["figures"] = [{"bench": f"bench_{name}", **r} for r in _common.RESULTS]
            entry["ok"] = not problems
            if problems:
                entry["error"] = "; ".join(problems)
            status = "ok" if entry["ok"] else "FAILED: " + entry["error"]
            print(f"== {name}: {len(entry['figures'])} figures, {status} in {entry['seconds']} s", flush=True)
            entries[name] = entry
    finally:
        spark.stop()
        bls.shutdown()
        shutil.rmtree(cache, ignore_errors=True)
    return entries


def _num(value, unit: str = "") -> str:
    if value is None:
        return "–"
    text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def markdown(results: dict) -> str:
    lines = ["# Benchmark results", "",
             "Written by `.venv/bin/python benchmarks/run_all.py`; each bench's figures are from the run named in "
             "its heading (date, commit, machine). Baselines are measured in the same run.", ""]
    for name, entry in results["benches"].items():
        m = entry["machine"]
        lines += [f"## {name}: `{entry['command']}`", "",
                  f"{entry['date']}, commit {entry['commit']}, {m['cpus']} CPUs, {m['memory_gib']} GiB, "
                  f"GPU: {m['gpu'] or 'none'}, load average at start {m['load_average']}, {entry['seconds']} s"
                  + (" (SMOKE sizes: not figures to quote)" if entry["smoke"] else "")
                  + ("" if entry["ok"] else " — **FAILED**: " + entry.get("error", "").splitlines()[0]), ""]
        if entry["figures"]:
            lines += ["| figure | measured | baseline (same run) | ratio | target |", "| --- | --- | --- | --- | --- |"]
            for r in entry["figures"]:
                measured = _num(r["figure"], r["unit"]) + (f" ({r['note']})" if r.get("note") else "")
                lines.append(f"| {r['title']} | {measured} | {_num(r['baseline'], r['unit'])} | {_num(r['ratio'])} "
                             f"| {r.get('target') or '–'} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated, of {', '.join(BENCHES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks every figure is finite and > 0")
    parser.add_argument("--out", default=None, help="folder for results.json/results.md (default: benchmarks/; "
                        "with --smoke, nothing is written unless given)")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per bench (full size)")
    parser.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                        help="more arguments for one bench at full size, e.g. 'finetune=--repeat 1' (a reduced "
                        "size; the command recorded in the results shows them)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise SystemExit(f"--only: {unknown} not benches; available: {', '.join(BENCHES)}")
    names = [n for n in BENCHES if n in names]  # serving first: its cold deploy needs the empty cache
    more: dict[str, list[str]] = {}
    for item in args.args:
        name, _, text = item.partition("=")
        if name not in BENCHES or args.smoke:
            raise SystemExit(f"--args {item!r}: expected NAME=ARGS with NAME one of {', '.join(BENCHES)}, without --smoke")
        more[name] = more.get(name, []) + shlex.split(text)
    out = args.out or (None if args.smoke else HERE)
    previous: dict = {}
    if out and os.path.exists(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            previous = json.load(f).get("benches", {})
    start = time.perf_counter()
    if args.smoke:
        entries = run_in_process(names)
    else:
        entries = {name: run_bench(name, False, args.timeout, more.get(name, [])) for name in names}
    print(f"== {len(entries)} benches in {time.perf_counter() - start:.1f} s", flush=True)
    failed = [n for n, e in entries.items() if not e["ok"]]
    if out:
        benches = {n: previous[n] for n in BENCHES if n in previous and n not in entries}
        benches.update(entries)
        results = {"written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "benches": {n: benches[n] for n in BENCHES if n in benches}}
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(markdown(results))
        print(f"wrote {os.path.join(out, 'results.json')} and results.md", flush=True)
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)} (see the output above)")


if __name__ == "__main__":
    main()
