"""Save and load throughput of model tables against ``cp -r``, with peak RSS.

Builds a model-like directory (a few large random "weight" files plus small JSON files, like a
Hugging Face checkpoint), then, ``--repeat`` times in the same run:

* ``cp -r`` of the directory (the yardstick),
* "sha256 only": reading and hashing every byte on all cores, the floor of any verified copy,
* ``save_model_table`` into a fresh table,
* ``load_model_table`` into a fresh cache directory (verifying every checksum),

each in its own subprocess, which reports its own wall time for the operation and its peak RSS
(``VmHWM`` from /proc, else ``ru_maxrss``; the figure includes the interpreter and its imports,
printed separately). Medians are printed. Every run reads from the page cache (the directory
was just written), as does ``cp -r``; nothing is fsync'ed by either, and ``sync`` runs (untimed)
before each operation so none pays for the previous one's writeback.

Usage::

    .venv/bin/python benchmarks/bench_model_table.py                # 1024 MB, 3 repeats
    .venv/bin/python benchmarks/bench_model_table.py --size-mb 256 --repeat 1
    .venv/bin/python benchmarks/bench_model_table.py --smoke        # 8 MB, once: figures finite and > 0
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import add_smoke_flag, finish, measured, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from byzerllm_spark import model_table as mt
import deltalake, pyarrow, pyarrow.parquet  # imported before the clock starts, as in a worker

def peak_mb():
    # VmHWM is this process's own high-water mark; ru_maxrss of a freshly spawned child can
    # carry the parent's RSS over from fork (Linux keeps the pre-exec mm's hiwater).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

base = peak_mb()
op, args = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
if op == "save":
    result = mt.save_model_table(args["src"], args["table"], chunk_size=args["chunk_size"])
elif op == "sha256":
    # The floor of any verified copy: read every byte once and sha256 it, on all cores.
    import hashlib
    from concurrent.futures import ThreadPoolExecutor
    size = args["chunk_size"]
    def one(job):
        path, offset = job
        with open(path, "rb") as f:
            f.seek(offset)
            return hashlib.sha256(f.read(size)).digest()
    jobs = [(os.path.join(d, n), o) for d, _, ns in os.walk(args["src"]) for n in ns
            for o in range(0, max(1, os.path.getsize(os.path.join(d, n))), size)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        result = len(list(pool.map(one, jobs)))
else:
    result = mt.load_model_table(args["table"], cache_dir=args["cache"])
seconds = time.perf_counter() - t0
peak = peak_mb()
print(json.dumps({{"seconds": seconds, "peak_mb": peak, "base_mb": base, "result": result}}))
"""


def build_model_dir(path: str, size_mb: int) -> int:
    """A checkpoint-shaped directory of about ``size_mb`` MB; returns its exact byte size."""
    import numpy as np

    rng = np.random.default_rng(0)
    os.makedirs(path)
    small = {
        "config.json": {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048},
        "generation_config.json": {"max_new_tokens": 256, "temperature": 0.7},
        "special_tokens_map.json": {"bos_token": "<s>", "eos_token": "</s>"},
        "tokenizer_config.json": {"model_max_length": 4096, "tokenizer_class": "LlamaTokenizer"},
        "tokenizer.json": {"model": {"vocab": {f"tok{i}": i for i in range(60000)}}},
        "model.safetensors.index.json": {
            "weight_map": {f"layer.{i}.weight": "model-00001.safetensors" for i in range(2000)}
        },
    }
    for name, obj in small.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f)
    total = size_mb << 20
    shares = [0.45, 0.30, 0.25]  # a few large shards of unequal size
    for i, share in enumerate(shares):
        remaining = int(total * share)
        name = f"model-{i + 1:05d}-of-{len(shares):05d}.safetensors"
        with open(os.path.join(path, name), "wb") as f:
            while remaining:
                n = min(remaining, 64 << 20)
                f.write(rng.bytes(n))
                remaining -= n
    return sum(os.path.getsize(os.path.join(dp, n)) for dp, _, ns in os.walk(path) for n in ns)


def run_child(op: str, **args) -> dict:
    os.sync()  # start every timed operation with no dirty pages from the previous one
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=ROOT), op, json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{op} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_cp(src: str, dst: str) -> float:
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", src, dst], check=True)
    return time.perf_counter() - t0


def same_tree(a: str, b: str) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(same_tree(os.path.join(a, d), os.path.join(b, d)) for d in cmp.common_dirs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024, help="model dir size (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--chunk-size", type=int, default=4 << 20, help="default 4 MiB")
    parser.add_argument("--tmp", default=None, help="scratch directory (default: system temp)")
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size_mb, args.repeat, args.chunk_size = 8, 1, 1 << 20
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    """Every figure; needs neither Ray nor ``spark`` (each operation runs in a process of its own)."""
    work = tempfile.mkdtemp(prefix="bench-model-table-", dir=args.tmp)
    try:
        src = os.path.join(work, "model")
        size = build_model_dir(src, args.size_mb)
        mb = size / 2**20
        print(
            f"model dir: {mb:.0f} MB in {len(os.listdir(src))} files, chunk "
            f"{args.chunk_size >> 20} MiB, {os.cpu_count()} CPUs, python {sys.version.split()[0]}"
        )
        cp_s, sha_s, save_s, load_s, save_rss, load_rss, base = [], [], [], [], [], [], []
        for i in range(args.repeat):
            dst = os.path.join(work, f"cp{i}")
            cp_s.append(time_cp(src, dst))
            shutil.rmtree(dst)
            sha_s.append(run_child("sha256", src=src, chunk_size=args.chunk_size)["seconds"])

            table = os.path.join(work, f"table{i}")
            r = run_child("save", src=src, table=table, chunk_size=args.chunk_size)
            save_s.append(r["seconds"])
            save_rss.append(r["peak_mb"])
            base.append(r["base_mb"])

            cache = os.path.join(work, f"cache{i}")
            r = run_child("load", table=table, cache=cache)
            load_s.append(r["seconds"])
            load_rss.append(r["peak_mb"])
            if i == 0 and not same_tree(src, r["result"]):
                raise SystemExit("loaded directory differs from the source")
            shutil.rmtree(cache)
            shutil.rmtree(table)

        cp, sha, save, load = (statistics.median(x) for x in (cp_s, sha_s, save_s, load_s))
        head = ("operation", "seconds", "MB/s", "vs cp -r", "vs sha256", "peak RSS MB")
        print(f"{head[0]:<12}{head[1]:>9}{head[2]:>9}{head[3]:>10}{head[4]:>11}{head[5]:>13}")
        for name, sec, rss in (
            ("cp -r", cp, None),
            ("sha256 only", sha, None),
            ("save", save, max(save_rss)),
            ("load", load, max(load_rss)),
        ):
            peak = "-" if rss is None else f"{rss:.0f}"
            print(f"{name:<12}{sec:>9.2f}{mb / sec:>9.0f}{cp / sec:>10.2f}{sha / sec:>11.2f}{peak:>13}")
        print(
            f"(medians of {args.repeat}; peak RSS is the max over runs and includes the "
            f"{statistics.median(base):.0f} MB of a Python process with pyarrow and deltalake "
            f"imported)"
        )
        runs = zip(cp_s, sha_s, save_s, load_s)
        print("runs (cp/sha256/save/load seconds):",
              "; ".join(f"{c:.2f}/{h:.2f}/{s:.2f}/{ld:.2f}" for c, h, s, ld in runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = f"{mb:.0f} MB model dir, median of {args.repeat}"
    report(f"model table save, {size}", mb / save, mb / cp, "MB/s", ">= 0.5 of cp -r")
    report(f"model table load (verified), {size}", mb / load, mb / cp, "MB/s", ">= 0.7 of cp -r")
    report(f"sha256-only read of the same bytes (floor of a verified copy), {size}", mb / sha, mb / cp, "MB/s",
           "information")
    measured(f"model table save, peak RSS ({args.size_mb} MB dir)", max(save_rss), "MB", "< 300 MB at 1 GB")
    measured(f"model table load, peak RSS ({args.size_mb} MB dir)", max(load_rss), "MB", "< 300 MB at 1 GB")


def main() -> None:
    run(parse_args())
    finish("bench_model_table")


if __name__ == "__main__":
    main()
