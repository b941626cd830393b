"""Answers/s with a JSON schema (``response_format``, constrained decoding) against the same prompts without
one, same backend, same run: SmolLM2 on transformers (llguidance masks each step) and on llama.cpp (its
JSON-schema grammar).

Each engine gets one worker; ``--rows`` made-up sentences ("Extract city and year: Ana moved to Lima in
1987.") go through ``bls.chat_batch`` (the Arrow route Spark uses) with ``max_length`` ``--max-length``,
temperature 0, once plain and once with the schema ``{city: string, year: integer}``, alternating,
``--repeat`` times (medians; the best run of each mode is printed too, for a shared, noisy machine).
Figures per engine:

* answers/s with the schema, against answers/s without it (issue 15's figure; target: ratio >= 0.8);
* completion tokens/s with the schema, against without it: the cost per generated token of the grammar,
  the fair comparison, since the two modes' answers differ in length (same prompts and ``max_length``,
  but SmolLM2's JSON answer on transformers, ``{"city": "Lima", "year": 1987}``, is longer than its
  plain "Lima, 1987."; on llama.cpp its plain answers run on and are longer than the JSON). Forcing
  equal lengths would change what is measured (a JSON answer cannot run past its closing brace), so the
  mean completion tokens of an answer are printed for both modes instead.

Usage::

    .venv/bin/python benchmarks/bench_structured.py                 # 48 rows, max_length 48, 3 repeats
    .venv/bin/python benchmarks/bench_structured.py --engines llama_cpp --repeat 1
    .venv/bin/python benchmarks/bench_structured.py --smoke         # 4 rows, 1 repeat: every figure finite and > 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import add_smoke_flag, deployment, main_on_ray, report  # noqa: E402

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
          "required": ["city", "year"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jon"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome", "Quito", "Delhi", "Vienna", "Dublin"]


def prompts(n: int) -> list[str]:
    return [f"Extract city and year: {NAMES[i % 10]} moved to {CITIES[(i * 3) % 10]} in {1950 + (i * 7) % 70}."
            for i in range(n)]


def timed(model: str, rows: list[dict]) -> tuple[float, float, float]:
    """(answers/s, completion tokens/s, completion tokens per answer) of one pass over ``rows``; every row must
    be answered."""
    import byzerllm_spark as bls

    start = time.perf_counter()
    answers = bls.chat_batch(model, rows, with_metadata=True, batch_size=16)
    seconds = time.perf_counter() - start
    failed = [a["error"] for a in answers if a["error"]]
    if failed:
        raise SystemExit(f"{model}: {len(failed)} of {len(rows)} rows failed, e.g. {failed[0]}")
    tokens = sum(int(a["metadata"].get("completion_tokens") or 0) for a in answers)
    return len(rows) / seconds, tokens / seconds, tokens / len(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="transformers,llama_cpp")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.repeat = 4, 1  # max_length stays: a JSON answer cut short is an error
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    """Every figure, on the cluster ``bls.init()`` started (``spark`` is not used)."""
    texts = prompts(args.rows)
    plain = [{"instruction": t, "max_length": args.max_length, "temperature": 0} for t in texts]
    structured = [{**row, "response_format": FORMAT} for row in plain]
    for engine in args.engines.split(","):
        # bench_serving's SmolLM2 deployments (run_all.py --smoke reuses their workers)
        name = f"bench_smol_{engine}"
        with deployment(name, infer_backend=engine, num_workers=1, cpus_per_worker=1):
            timed(name, plain[:2] + structured[:2])  # warm: model, grammar library, tokenizer tables
            runs: dict[str, list[tuple[float, float, float]]] = {"plain": [], "schema": []}
            for rep in range(args.repeat):
                for mode, rows in (("plain", plain), ("schema", structured)):
                    runs[mode].append(timed(name, rows))
                    print(f"  {engine} run {rep + 1} {mode:6s} {runs[mode][-1][0]:6.2f} answers/s "
                          f"{runs[mode][-1][1]:7.1f} tokens/s {runs[mode][-1][2]:5.1f} tokens/answer "
                          f"load {os.getloadavg()[0]:.0f}", flush=True)
        answers = {mode: statistics.median(v[0] for v in values) for mode, values in runs.items()}
        tokens = {mode: statistics.median(v[1] for v in values) for mode, values in runs.items()}
        best = {mode: max(v[0] for v in values) for mode, values in runs.items()}
        length = {mode: statistics.median(v[2] for v in values) for mode, values in runs.items()}
        print(f"  {engine} best of {args.repeat}: {best['schema']:.2f} vs {best['plain']:.2f} answers/s, ratio "
              f"{best['schema'] / best['plain']:.2f}; tokens per answer {length['schema']:.1f} with the schema, "
              f"{length['plain']:.1f} without", flush=True)
        size = f"{args.rows} rows, max_length {args.max_length}, median of {args.repeat}"
        report(f"{engine}: answers/s with a JSON schema vs without ({size})", answers["schema"], answers["plain"],
               "answers/s", ">= 0.8")
        report(f"{engine}: completion tokens/s with a JSON schema vs without ({size})", tokens["schema"],
               tokens["plain"], "tokens/s")


def main() -> None:
    main_on_ray("bench_structured", parse_args, run)


if __name__ == "__main__":
    main()
