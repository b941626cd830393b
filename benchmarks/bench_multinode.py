"""Echo rows/s from a Spark standalone cluster across two Ray nodes, against the same query served by one
node, in one run.

The two-node cluster of ``tests/_multinode.py`` (two network namespaces on this machine: each a Ray
node and a Spark worker; it needs root). A driver on node b deploys the echo plugin twice in turn:
``--workers`` workers pinned to node a (the baseline: every executor's rows cross to one node), then
the same count spread over both nodes; each is timed on ``SELECT count(chat(llm_param(map('instruction',
s)))) FROM range(--rows)`` through the ``EveryNode`` proxies, best of ``--repeat``. On one machine the two
"hosts" share its cores, so the ratio shows what crossing nodes costs, not what more hardware gains.

Usage::

    sudo .venv/bin/python benchmarks/bench_multinode.py            # 200,000 rows, best of 3
    .venv/bin/python benchmarks/bench_multinode.py --smoke         # 2,000 rows, once
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _common import add_smoke_flag, finish, report  # noqa: E402

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_multinode_bench_driver.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2, help="workers; at most 2 (each node has 1 CPU)")
    parser.add_argument("--repeat", type=int, default=3)
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.repeat = 2000, 1
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    import _multinode

    why = _multinode.unavailable()
    if why:
        raise SystemExit(f"bench_multinode needs a two-node cluster on this machine: {why}")
    cluster = _multinode.Cluster()
    try:
        cluster.start()
        done = cluster.run_python("b", DRIVER, cluster.ray_address, cluster.spark_master, cluster.nodes["b"][1],
                                  str(args.rows), str(args.workers), str(args.repeat), timeout=3600)
    finally:
        cluster.stop()
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the bench driver failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    seen = json.loads(lines[-1][len("RESULT "):])
    report(f"echo rows/s, standalone Spark (2 executors) -> {args.workers} workers on 2 Ray nodes vs on 1 node",
           seen["two_nodes"], seen["one_node"], "rows/s")


def main() -> None:
    run(parse_args())
    finish("bench_multinode")


if __name__ == "__main__":
    main()
