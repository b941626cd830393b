"""The cost of batch-independent seeded sampling on transformers: rows with a ``seed`` (each sampling from its own
generator inside one batched ``generate`` call, so a row's answer never depends on its batch) against the
same rows without one (one shared random stream), same backend, same run.

SmolLM2 (the embedded model) on transformers, in this process (no Ray: the engine alone), ``--rows`` prompts
at temperature 1.0, ``max_length`` ``--max-length``, once plain and once with ``seed=i`` on row i, alternating,
``--repeat`` times (medians). Also checks what the seeds are for: each seeded row's answer alone equals its
answer in the batch. Figures: rows/s and completion tokens/s, seeded and plain, and their ratios (target:
>= 0.9).

Measured here (2026-11-30, 2 cores shared, load 12-48): medians of 5, rows/s ratio 0.95, completion tokens/s
ratio 0.98, seeded rows alone == batched. Generating each seeded row alone instead (torch seeded before each
call), as a first version did, took 30.4 s for the 8 rows against 8.5 s batched.

Usage::

    .venv/bin/python benchmarks/bench_seed.py                # 8 rows, max_length 24, 3 repeats
    .venv/bin/python benchmarks/bench_seed.py --smoke        # 2 rows, 1 repeat
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="2 rows, 1 repeat")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.repeat = 2, 1

    from byzerllm_spark.backends import registry
    from byzerllm_spark.backends._model_files import default_model_dir
    from byzerllm_spark.config import DeployConfig
    from byzerllm_spark.protocol.request import parse_request

    backend = registry.build(DeployConfig(model="bench_seed", infer_backend="transformers", cpus_per_worker=1),
                             default_model_dir())
    base = [{"instruction": f"Write one sentence about the number {i}.", "temperature": 1.0,
             "max_length": args.max_length} for i in range(args.rows)]
    seeded = [{**row, "generation.seed": i} for i, row in enumerate(base)]

    def run(rows):
        started = time.perf_counter()
        answers = asyncio.run(backend.chat_batch([parse_request(r) for r in rows]))
        seconds = time.perf_counter() - started
        tokens = sum(int(a.metadata["completion_tokens"]) for a in answers)
        return (len(rows) / seconds, tokens / seconds), answers

    plain_rates, seeded_rates = [], []
    for _ in range(args.repeat):
        plain_rates.append(run(base)[0])
        rate, batched = run(seeded)
        seeded_rates.append(rate)
    alone = [run([row])[1][0].response for row in seeded]
    same = alone == [a.response for a in batched]
    backend.close()
    plain, with_seed = (statistics.median(r[0] for r in plain_rates), statistics.median(r[0] for r in seeded_rates))
    plain_tok, seeded_tok = (statistics.median(r[1] for r in plain_rates), statistics.median(r[1] for r in seeded_rates))
    print(f"rows/s plain {plain:.3f}  seeded {with_seed:.3f}  ratio {with_seed / plain:.2f}; completion tokens/s "
          f"plain {plain_tok:.1f}  seeded {seeded_tok:.1f}  ratio {seeded_tok / plain_tok:.2f}  "
          f"(rows {args.rows}, max_length {args.max_length}, medians of {args.repeat}); "
          f"seeded rows alone == batched: {same}")
    if not same:
        sys.exit("a seeded row's answer alone differs from its answer in the batch")


if __name__ == "__main__":
    main()
