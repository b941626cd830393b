"""SmolLM2 answers/s through Spark SQL on an ``infer_backend='vllm'`` deployment against vLLM's own offline
``LLM.chat`` (``LLM.generate`` with the chat template) on the same prompts, same sampling, same engine
arguments, same run; then the same prompts through SQL on the transformers and llama.cpp backends.

The offline baseline runs first, in the vLLM environment as a subprocess (benchmarks/_vllm_offline.py),
and ends before the deployment starts, so the two never share the CPUs. Each side is warmed with two
prompts before it is timed; the offline side times the ``chat`` call alone, the SQL side the whole query
(Spark tasks, Arrow over HTTP, the Serve worker, one HTTP request per row to its vLLM server). Figures:

* vllm: SQL answers/s vs offline ``LLM.chat`` answers/s (target: ratio >= 0.9);
* vllm: ``bls.chat_batch`` answers/s (the rows as one request, no Spark) vs offline: the serving path's
  own cost, apart from Spark's executors on the same CPUs;
* vllm: where the CPU goes (printed, not a figure): CPU seconds per part during the SQL query (vLLM's engine
  core, its API server, the Serve worker, Serve's proxy, Spark's JVM and Python workers, the rest of Ray
  and this driver) against the offline run's (its front end and engine core). On a 2-core machine every
  CPU second the serving path spends is one the engine does not get;
* transformers and llama_cpp: SQL answers/s on the same prompts, each against the vLLM offline figure
  (the table of the README's vLLM section).

Not in ``run_all.py``'s list: starting vLLM twice costs minutes on 2 cores, beyond CI's smoke budget
(tests/test_vllm.py covers the backend in CI). It follows the same conventions: ``run(args, spark)``,
``--smoke``, figures through ``_common.report`` / ``finish``.

Usage::

    .venv/bin/python benchmarks/bench_vllm.py                   # 256 prompts, max_length 32
    .venv/bin/python benchmarks/bench_vllm.py --engines vllm    # the vLLM ratio alone
    .venv/bin/python benchmarks/bench_vllm.py --engines vllm --engine-args optimization_level=0
    .venv/bin/python benchmarks/bench_vllm.py --engines vllm --deploy-engine-args max_num_seqs=128 \
        max_num_batched_tokens=2048                              # the deployment at vLLM's API-server sizes
    .venv/bin/python benchmarks/bench_vllm.py --smoke           # 8 prompts: every figure finite and > 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import add_smoke_flag, deployment, main_on_ray, report, spark_session  # noqa: E402

SUBJECTS = ["France", "Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Brazil", "India", "Kenya",
            "Peru", "Norway", "Chile", "Greece", "Poland", "Mexico"]
QUESTIONS = ["What is the capital of {}?", "Name a famous food from {}.", "What language is spoken in {}?",
             "Describe the flag of {} in one sentence.", "What is the climate of {} like?",
             "Name a river in {}.", "What currency does {} use?", "Name a famous person from {}.",
             "What continent is {} in?", "Give one fact about the history of {}.",
             "What sport is popular in {}?", "Name a mountain in {}.", "What is a holiday celebrated in {}?",
             "Name an animal that lives in {}.", "What is the population of {} roughly?",
             "Name a city in {} other than the capital."]
#: The deployment's and the offline engine's arguments: the backend's CPU defaults, written out.
ENGINE_ARGS = {"max_model_len": 2048, "dtype": "float32", "gpu_memory_utilization": 0.1, "optimization_level": 0,
               "max_num_seqs": 256, "max_num_batched_tokens": 4096}


def prompts(n: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)].format(SUBJECTS[(i // len(QUESTIONS)) % len(SUBJECTS)]) for i in range(n)]


def offline(texts: list[str], max_length: int, top_p: float, engine_args: dict, *, model: str | None = None,
            row_adapters: list[str | None] | None = None, min_tokens: int = 0) -> dict:
    """vLLM's offline answers of ``texts`` in the vLLM environment: ``{"seconds", "answers", ...}``. ``model``:
    a model directory (default: the embedded SmolLM2's dequantised copy); ``row_adapters``: a LoRA adapter
    directory or None per text (``engine_args`` must turn LoRA on); ``min_tokens``: vLLM's floor per answer."""
    from byzerllm_spark.backends._model_files import default_model_dir, dequantised_dir, find_gguf
    from byzerllm_spark.backends.vllm_backend import vllm_python

    sampling = {"temperature": 0.0, "top_p": top_p, "max_tokens": max_length, "min_tokens": min_tokens}
    spec = {"model": model or dequantised_dir(find_gguf(default_model_dir())), "engine_args": engine_args,
            "prompts": texts, "sampling": sampling, "row_adapters": row_adapters}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([vllm_python(), os.path.join(ROOT, "benchmarks", "_vllm_offline.py")],
                          input=json.dumps(spec), capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"vLLM offline run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _part(proc) -> str:
    """Which part of the serving path a process of this machine is (by its command line)."""
    try:
        cmd = " ".join(proc.cmdline())
    except Exception:
        return "gone"
    if "EngineCore" in cmd or "EngineCore" in proc.name():
        return "vLLM engine core (scheduler)"
    if "VLLM" in cmd or "VLLM" in proc.name() or "spawn_main" in cmd:
        return "vLLM model worker (forward passes)"
    for mark, part in (("_vllm_server.py", "vLLM API server"), ("ServeReplica", "Serve worker (replica)"),
                       ("ProxyActor", "Serve proxy"), ("pyspark", "Spark Python workers"), ("java", "Spark JVM")):
        if mark in cmd:
            return part
    return "Ray, this driver, the rest"


def cpu_by_part() -> dict[str, float]:
    """CPU seconds (user + system) so far of this driver and every process under it (Ray's, the Serve worker
    and its vLLM server with its engine core, Spark's), summed per part of the path (see :func:`_part`)."""
    import psutil

    me = psutil.Process()
    out: dict[str, float] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            seconds = sum(proc.cpu_times()[:2])
        except psutil.Error:
            continue
        part = _part(proc) if proc is not me else "Ray, this driver, the rest"
        out[part] = out.get(part, 0.0) + seconds
    return out


def print_cpu(title: str, before: dict[str, float], after: dict[str, float], answers: int) -> None:
    spent = {part: after[part] - before.get(part, 0.0) for part in after}
    total = sum(spent.values())
    print(f"  CPU seconds, {title}: {total:.1f} in all ({total / answers * 1000:.0f} ms an answer): " + ", ".join(
        f"{part} {seconds:.1f}" for part, seconds in sorted(spent.items(), key=lambda kv: -kv[1]) if seconds >= 0.05),
        flush=True)


def sql_answers_per_s(spark, model: str, texts: list[str], max_length: int) -> float:
    """Answers/s of one SQL query over ``texts`` (every row answered, or the bench fails); prints the CPU seconds
    each part of the path spent in it."""
    import byzerllm_spark as bls

    udf = f"{model}_fn"
    bls.register_model_function(spark, model, udf_name=udf, fail_on_error=False)
    df = spark.createDataFrame([(i, t) for i, t in enumerate(texts)], "id int, q string").repartition(2)
    df.createOrReplaceTempView("bench_vllm_prompts")
    query = (f"SELECT id, {udf}(llm_param(map('instruction', q, 'temperature', '0', 'max_length', "
             f"'{max_length}'))) AS r FROM bench_vllm_prompts")
    spark.sql(query.replace("bench_vllm_prompts", "(SELECT * FROM bench_vllm_prompts LIMIT 2)")).collect()  # warm
    cpu_before = cpu_by_part()
    start = time.perf_counter()
    rows = spark.sql(query).collect()
    seconds = time.perf_counter() - start
    print_cpu(f"SQL on {model}", cpu_before, cpu_by_part(), len(texts))
    failed = [r.r.error for r in rows if r.r is None or r.r.error or not r.r.response]
    if len(rows) != len(texts) or failed:
        raise SystemExit(f"{model}: {len(failed)} of {len(texts)} rows failed, e.g. {failed[:1]}")
    return len(texts) / seconds


def direct_answers_per_s(model: str, texts: list[str], max_length: int) -> float:
    """Answers/s of ``texts`` sent by ``bls.chat_batch`` as one Arrow request: the serving path without
    Spark (the worker, its HTTP requests to vLLM's server), to tell its cost from Spark's."""
    import byzerllm_spark as bls

    rows = [{"instruction": t, "temperature": 0, "max_length": max_length} for t in texts]
    start = time.perf_counter()
    answers = bls.chat_batch(model, rows, batch_size=len(rows))
    seconds = time.perf_counter() - start
    if len(answers) != len(rows) or not all(answers):
        raise SystemExit(f"{model}: bls.chat_batch left rows unanswered")
    return len(rows) / seconds


def _with(engine_args: dict, items: list[str]) -> dict:
    """``engine_args`` with each ``NAME=VALUE`` of ``items`` over it (digits as ints)."""
    for item in items:
        name, _, value = item.partition("=")
        engine_args[name] = int(value) if value.isdigit() else value
    return engine_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="vllm,transformers,llama_cpp")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--engine-args", nargs="*", default=[], metavar="NAME=VALUE",
                        help="vLLM engine arguments over ENGINE_ARGS, for both sides (e.g. optimization_level=0)")
    parser.add_argument("--deploy-engine-args", nargs="*", default=[], metavar="NAME=VALUE",
                        help="vLLM engine arguments for the deployment alone (e.g. max_num_seqs=128: vLLM's API "
                             "server's CPU default, against the offline engine's 256)")
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts = 8
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    from byzerllm_spark.protocol.request import DEFAULT_TOP_P

    texts = prompts(args.prompts)
    spark = spark or spark_session("bench-vllm")
    engine_args = _with(dict(ENGINE_ARGS), args.engine_args)
    base = offline(texts, args.max_length, DEFAULT_TOP_P, engine_args)
    base_rate = len(texts) / base["seconds"]
    size = f"{len(texts)} prompts, max_length {args.max_length}, temperature 0" + "".join(
        f", {item}" for item in args.engine_args) + "".join(f", deployment's {item}" for item in args.deploy_engine_args)
    print(f"  vLLM offline LLM.chat: {base_rate:.2f} answers/s ({base['completion_tokens']} completion tokens "
          f"in {base['seconds']:.1f} s)", flush=True)
    print_cpu("vLLM offline LLM.chat", {}, base["cpu_seconds"], len(texts))
    for engine in args.engines.split(","):
        kwargs = {"infer_backend": engine, "num_workers": 1, "cpus_per_worker": 1, "wait_ready_timeout": 1200}
        if engine == "vllm":
            deploy_args = _with(dict(engine_args), args.deploy_engine_args)
            kwargs["infer_params"] = {f"backend.{k}": str(v) for k, v in deploy_args.items()}
        with deployment(f"bench_vllm_{engine}", **kwargs) as name:
            rate = sql_answers_per_s(spark, name, texts, args.max_length)
            direct = direct_answers_per_s(name, texts, args.max_length) if engine == "vllm" else None
        if engine == "vllm":
            report(f"vllm: SQL answers/s vs vLLM offline LLM.chat ({size})", rate, base_rate, "answers/s", ">= 0.9")
            report(f"vllm: bls.chat_batch answers/s (one request, no Spark) vs vLLM offline LLM.chat ({size})",
                   direct, base_rate, "answers/s")
        else:
            report(f"{engine}: SQL answers/s vs vLLM offline LLM.chat ({size})", rate, base_rate, "answers/s")


def main() -> None:
    main_on_ray("bench_vllm", parse_args, run)


if __name__ == "__main__":
    main()
