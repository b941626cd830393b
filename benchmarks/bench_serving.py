"""Serving figures. Run: .venv/bin/python benchmarks/bench_serving.py [--skip-models] [--smoke]

1. Seconds from deploy() to the first answer, embedded SmolLM2, both backends, deploys taken in
   turn: the first transformers deploy on a node with an empty cache (it dequantises the GGUF
   into the per-node cache), later transformers deploys (load that copy) and llama.cpp (best of
   ``--deploys``). Target: later transformers deploys within 3x llama.cpp's time.
2. Rows/s through the Arrow endpoint with the echo plugin (batches of 1,000) against the same
   plugin called in-process on the same rows. Target: >= 50,000 rows/s.
3. SmolLM2 tokens/s through a 2-worker deployment against the backend called in-process with the
   same concurrency (2 threads, 2 model instances, 1 CPU each). Target: >= 0.9 of in-process.

The run uses a fresh, temporary cache folder (``BYZERLLM_CACHE_DIR``), so the first deploy is cold.
``--smoke`` (1 worker, a few rows and tokens, one deploy of each) only checks that every figure comes
out finite and > 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from _common import add_smoke_flag, deployment, finish, measured, report, run_in_threads

import byzerllm_spark as bls
from byzerllm_spark.protocol import arrow as _arrow
from byzerllm_spark.transport import post_arrow
from byzerllm_spark.protocol.request import parse_request

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
    "Give me a synonym for happy.", "What do bees make?", "Which planet is known as the red planet?",
    "Translate 'thank you' into Spanish.", "What is the boiling point of water in Celsius?",
]


def first_answer_seconds(backend: str) -> float:
    name = f"bench_smol_{backend}"
    if bls.exists(name):
        bls.undeploy(name)  # what is timed is a deploy from nothing
    start = time.perf_counter()
    # Kept by run_all.py --smoke, where bench_tokens (1 worker) and bench_spark reuse this worker.
    with deployment(name, infer_backend=backend, num_workers=1, cpus_per_worker=1):
        answer = bls.chat(name, "What is the capital of France?", temperature=0, max_length=32)
        seconds = time.perf_counter() - start
    print(f"  deploy -> first answer, {backend}: {seconds:.1f} s ({answer!r})", flush=True)
    return seconds


def bench_first_answer(deploys: int) -> None:
    # In turn, so both backends see the same load on this shared machine; the first transformers
    # deploy finds the run's cache folder empty and dequantises the GGUF into it.
    cold = first_answer_seconds("transformers")
    runs: dict[str, list[float]] = {"transformers": [], "llama_cpp": []}
    for _ in range(deploys):
        for backend in ("llama_cpp", "transformers"):
            runs[backend].append(first_answer_seconds(backend))
    measured("deploy -> first answer, transformers, first deploy on the node (empty cache)", cold, "s")
    measured(f"deploy -> first answer, transformers, later deploys (best of {deploys})", min(runs["transformers"]),
             "s", note="runs: " + ", ".join(f"{x:.1f}" for x in runs["transformers"]))
    measured(f"deploy -> first answer, llama.cpp (best of {deploys})", min(runs["llama_cpp"]), "s",
             note="runs: " + ", ".join(f"{x:.1f}" for x in runs["llama_cpp"]))
    report("deploy -> first answer, later transformers deploys vs llama.cpp", min(runs["transformers"]),
           min(runs["llama_cpp"]), "s", "ratio <= 3")


def _answered(body: bytes) -> int:
    """Rows of an Arrow answer; a row answered with an error is no throughput, so it stops the bench."""
    table = _arrow.decode_results(body)
    failed = table.num_rows - table.column("error").null_count
    if failed:
        first = next(e for e in table.column("error").to_pylist() if e is not None)
        raise RuntimeError(f"{failed} of {table.num_rows} rows came back with an error, e.g. {first[:500]}")
    return table.num_rows


def bench_overhead(total_rows: int, batch: int, inflight: int, workers: int) -> None:
    from byzerllm_spark.backends import echo

    rows = [json.dumps({"instruction": f"row {i}", "temperature": "0"}) for i in range(total_rows)]
    # Baseline: the plugin called in-process on the same rows (parse + stream_chat per row).
    model, tok = echo.init_model(None, {}, {})
    start = time.perf_counter()
    for text in rows:
        req = parse_request(text)
        model.stream_chat(tok, req.instruction, list(req.history), max_length=req.max_length,
                          top_p=req.top_p, temperature=req.temperature)
    in_process = total_rows / (time.perf_counter() - start)

    endpoint = bls.endpoint()
    bodies = [_arrow.encode_params(rows[i : i + batch]) for i in range(0, total_rows, batch)]
    with deployment("bench_echo", pretrained_model_type="custom/echo", num_workers=workers, cpus_per_worker=0.5,
                    worker_concurrency=max(1, inflight // workers)):
        _answered(post_arrow(endpoint, "bench_echo", bodies[0]))  # warm the connection and the route
        start = time.perf_counter()
        with ThreadPoolExecutor(inflight) as pool:
            answered = sum(pool.map(lambda body: _answered(post_arrow(endpoint, "bench_echo", body)), bodies))
        through = answered / (time.perf_counter() - start)
    assert answered == total_rows
    report(f"Arrow endpoint, echo plugin, {workers} workers, batches of {batch}, {inflight} in flight", through,
           in_process, "rows/s", ">= 50,000 rows/s")


def bench_tokens(requests_per_worker: int, max_length: int, backend: str, workers: int) -> None:
    from byzerllm_spark.backends import registry
    from byzerllm_spark.backends._model_files import default_model_dir
    from byzerllm_spark.config import DeployConfig

    prompts = [{"instruction": QUESTIONS[i % len(QUESTIONS)], "temperature": 0, "max_length": max_length}
               for i in range(workers * requests_per_worker)]

    # In-process: one backend instance per worker, one thread each, the same requests one at a time.
    config = DeployConfig(model="inproc", infer_backend=backend, cpus_per_worker=1)
    instances = [registry.build(config, default_model_dir()) for _ in range(workers)]
    tokens = [0] * workers

    def drive(k: int, loop) -> None:
        for p in prompts[k::workers]:
            (res,) = loop.run_until_complete(instances[k].chat_batch([parse_request(p)]))
            tokens[k] += int(res.metadata["completion_tokens"])

    elapsed = run_in_threads(drive, workers)  # the threads fill `tokens`: sum it after they ran
    in_process = sum(tokens) / elapsed
    for inst in instances:
        inst.close()
    del instances

    served_tokens = [0]
    lock = threading.Lock()

    def call(p: dict) -> None:
        (row,) = bls.chat_batch(name, [p], with_metadata=True)
        with lock:
            served_tokens[0] += int(row["metadata"]["completion_tokens"])

    with deployment(f"bench_smol_{backend}", infer_backend=backend, num_workers=workers, cpus_per_worker=1) as name:
        bls.chat(name, "hi", max_length=4)
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(call, prompts))
        served = served_tokens[0] / (time.perf_counter() - start)
    report(f"SmolLM2 ({backend}) tokens/s, {workers} workers via Serve vs {workers} in-process", served, in_process,
           "tokens/s", ">= 0.9 of in-process")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="workers of the echo and SmolLM2 deployments")
    parser.add_argument("--requests", type=int, default=8, help="SmolLM2 requests per worker")
    parser.add_argument("--max-length", type=int, default=32, help="tokens per SmolLM2 answer")
    parser.add_argument("--deploys", type=int, default=3, help="later deploys of each backend (best of)")
    parser.add_argument("--skip-models", action="store_true", help="only the echo overhead figure")
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        # inflight 2 on 1 worker: the same echo deployment as bench_spark's, which run_all.py reuses
        args.rows, args.inflight, args.workers, args.requests, args.max_length, args.deploys = 2_000, 2, 1, 1, 4, 1
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    """Every figure, on the cluster ``bls.init()`` started. Its cache folder must be empty (the first
    transformers deploy is timed as the cold one); ``spark`` is not used."""
    from byzerllm_spark import settings

    cache = settings.cache_dir()
    if not args.skip_models and os.path.isdir(cache) and os.listdir(cache):
        raise SystemExit(f"bench_serving: the cache folder {cache} is not empty, so the first deploy would not be "
                         f"cold; point ${settings.CACHE_DIR_ENV} at an empty folder before bls.init()")
    bench_overhead(args.rows, args.batch, args.inflight, args.workers)
    if not args.skip_models:
        bench_first_answer(args.deploys)
        for backend in ("transformers", "llama_cpp"):
            bench_tokens(args.requests, args.max_length, backend, args.workers)


def main() -> None:
    args = parse_args()
    cache = tempfile.mkdtemp(prefix="bench-serving-cache-")
    os.environ["BYZERLLM_CACHE_DIR"] = cache  # before init: Ray's workers inherit it
    bls.init(http_port=0, include_dashboard=False)
    try:
        run(args)
    finally:
        bls.shutdown()
        shutil.rmtree(cache, ignore_errors=True)
    finish("bench_serving")


if __name__ == "__main__":
    main()
