"""The hot path before and after a change: the same benchmark run on an older commit and on this
checkout, in turns, in one run. Run:

    .venv/bin/python benchmarks/bench_before_after.py --before eca349e^            # the defaults below
    .venv/bin/python benchmarks/bench_before_after.py --before COMMIT --bench bench_spark.py --args=--skip-models

The older commit is checked out into a temporary ``git worktree`` and its own copy of the bench runs
with that commit's package first on ``PYTHONPATH`` (the driver, Ray's workers and Spark's Python
workers all inherit it); the same ``.venv`` serves both. The two sides run alternately ``--repeats``
times (before, after, before, ...), so a load that comes and goes hits both, and each figure is the
best of its runs. Printed: each of the bench's figures, this checkout against the older commit (ratio
1.0: no loss). Figures are parsed from the benches' own report lines (``TITLE: X unit vs baseline ...``),
which every commit of this repository prints, and paired in the order printed.

Default: the hot path of issue-17-style hardening (bounded bodies, slots taken with the whole request in
hand, stop signals, time-based retries, per-row validation) measured by ``bench_serving.py --skip-models``
(echo rows/s through Serve's Arrow route) and ``bench_spark.py --skip-models`` (echo rows/s through
Spark SQL).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(?P<title>[^\n:]+): (?P<figure>[\d,]+\.\d) (?P<unit>.+?) vs baseline ", re.MULTILINE)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="eca349e^", help="the older commit (any git revision)")
    parser.add_argument("--bench", action="append", help="bench script(s) under benchmarks/ "
                        "(default: bench_serving.py and bench_spark.py)")
    parser.add_argument("--args", default="--skip-models", help="arguments for every bench, one string")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating (best of)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per bench run")
    _common.add_smoke_flag(parser)
    return parser.parse_args(argv)


def figures(script: Path, package_root: Path, args: list[str], timeout: float) -> dict[str, tuple[float, str]]:
    """``{title: (figure, unit)}`` of one run of ``script`` with ``package_root``'s byzerllm_spark."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    check = subprocess.run([sys.executable, "-c", "import byzerllm_spark; print(byzerllm_spark.__file__)"],
                           env=env, capture_output=True, text=True, cwd=package_root, check=True)
    if not check.stdout.strip().startswith(str(package_root)):  # the .venv's own copy would shadow it
        raise SystemExit(f"{package_root}: byzerllm_spark came from {check.stdout.strip()}, not from there")
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          cwd=package_root, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    found = {m["title"]: (float(m["figure"].replace(",", "")), m["unit"]) for m in LINE.finditer(done.stdout)}
    if not found:
        raise SystemExit(f"{script} printed no figure:\n{done.stdout[-2000:]}")
    return found


def main(argv=None) -> None:
    args = parse_args(argv)
    benches = args.bench or ["bench_serving.py", "bench_spark.py"]
    # Older benches have no --smoke: a smoke run takes few rows instead (both benches of the default take --rows).
    bench_args = shlex.split(args.args) + (["--rows", "4000"] if args.smoke else [])
    repeats = 1 if args.smoke else args.repeats
    commit = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-before-") as temp:
        before = Path(temp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), commit], cwd=ROOT, check=True)
        try:
            for bench in benches:
                runs: dict[str, list[dict]] = {"before": [], "after": []}
                for _ in range(repeats):
                    for side, root in (("before", before), ("after", ROOT)):
                        runs[side].append(figures(root / "benchmarks" / bench, root, bench_args, args.timeout))
                        print(f"  {bench} {side} ({commit if side == 'before' else 'this checkout'}): "
                              f"{runs[side][-1]}", flush=True)
                # A bench's figures in print order; titles may have changed wording between the commits.
                for k, title in enumerate(runs["after"][0]):
                    pairs = [list(run.values())[k] for run in runs["before"] if len(run) > k]
                    if len(pairs) != len(runs["before"]):
                        continue
                    unit = runs["after"][0][title][1]
                    after = max(list(run.values())[k][0] for run in runs["after"])
                    earlier = max(figure for figure, _ in pairs)
                    _common.report(f"{title} [this checkout vs {commit}]", after, earlier, unit,
                                   "1.0 (no loss on the hot path)")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    _common.finish("bench_before_after")


if __name__ == "__main__":
    main()
