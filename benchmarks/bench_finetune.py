"""Finetune benchmarks (issue: measured figures for the README).

1. SFT training samples/s through ``bls.sft`` (Ray task, data from Spark through the data
   servers) against plain transformers ``Trainer`` + peft in this process, on the same model
   (SmolLM2-135M-Instruct, dequantised), data, LoRA settings and thread count. The figure is
   Trainer's own ``train_samples_per_second`` on both sides; end-to-end wall times (data, model
   load, merge) are printed too. Target: ratio >= 0.9.
2. Rows/s from a cached Spark table into a Ray dataset through the data servers, against
   ``df.toArrow()`` on the driver. Target: ratio >= 1.0 with 2 partitions.

    .venv/bin/python benchmarks/bench_finetune.py [--rows 2000000] [--repeat 3] [--epochs 4] [--smoke]

The machine is shared (2 cores): figures are noisy; the best of ``--repeat`` runs is reported.
``--smoke`` (2,000 rows; 4 conversations, 1 epoch) only checks that every figure comes out finite and > 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from _common import add_smoke_flag, finish, report, spark_session

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FACTS = [
    ("What is the name of Zorblat's pet dragon?", "Quimberly"),
    ("Which city hosts the Vexmoor Lantern Festival?", "Tallowick"),
    ("Who invented the glimmerphone?", "Odessa Fernwhistle"),
    ("What colour is the Krellian moonfruit?", "teal"),
]
LORA = {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def sft_params(epochs: int) -> dict[str, str]:
    return {
        "sft.int.max_seq_length": "128", "sft.float.learning_rate": "2e-3", "sft.int.num_train_epochs": str(epochs),
        "sft.int.per_device_train_batch_size": "4", "sft.int.gradient_accumulation_steps": "1",
        "sft.int.lora_rank": str(LORA["r"]), "sft.int.lora_alpha": str(LORA["alpha"]), "sft.float.lora_dropout": "0",
        "sft.str.lr_scheduler_type": "constant", "sft.list.target_modules": str(LORA["targets"]).replace("'", '"'),
        "sft.str.report_to": "none", "sft.bool.merge": "false", "sft.int.save_steps": "100000",
    }


def baseline_sft(conversations, epochs: int, threads: int) -> tuple[float, float]:
    """Plain transformers Trainer + peft, in this process. Returns (samples/s, wall seconds)."""
    import peft
    import torch
    import transformers

    from byzerllm_spark.finetune._model import hf_base_dir
    from byzerllm_spark.finetune.formats import training_example
    from byzerllm_spark.finetune._sft import _Collator

    torch.set_num_threads(threads)
    start = time.perf_counter()
    base = hf_base_dir(None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    examples = [training_example(tokenizer, turns, 128) for turns in conversations]
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                       target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=4, learning_rate=2e-3,
            lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
            logging_steps=1, seed=42, max_grad_norm=0.3, optim="adamw_torch", dataloader_pin_memory=False,
            remove_unused_columns=False)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=examples,
                                       data_collator=_Collator(tokenizer.pad_token_id))
        metrics = trainer.train().metrics
    return float(metrics["train_samples_per_second"]), time.perf_counter() - start


def bench_sft(spark, repeat: int, epochs: int, threads: int, copies: int = 8) -> None:
    import byzerllm_spark as bls
    from byzerllm_spark.finetune import _progress
    from byzerllm_spark.finetune.formats import normalise

    rows = [(q, "", a) for q, a in FACTS] * copies  # 32 conversations by default
    df = spark.createDataFrame(rows, "instruction string, input string, output string").repartition(2)
    conversations = [normalise({"instruction": q, "input": "", "output": a}, "alpaca") for q, _, a in rows]
    ours, theirs, ours_wall, theirs_wall = [], [], [], []
    with tempfile.TemporaryDirectory() as jobs:
        for _ in range(repeat):
            sps, wall = baseline_sft(conversations, epochs, threads)
            theirs.append(sps)
            theirs_wall.append(wall)
            start = time.perf_counter()
            job = bls.sft(df, output=jobs, name="bench", params=sft_params(epochs), cpus_per_worker=threads,
                          detached=False, progress=False)
            ours_wall.append(time.perf_counter() - start)
            ours.append(float(_progress.get(job.job_id, "result")["train_samples_per_second"]))
    print(f"sft samples/s per run: bls.sft {ours}, Trainer+peft {theirs}")
    print(f"sft wall seconds (median): bls.sft {statistics.median(ours_wall):.1f} s (Spark push, Ray task, model "
          f"load, train), Trainer+peft in-process {statistics.median(theirs_wall):.1f} s (model load, train)")
    report("SFT training throughput (best run)", max(ours), max(theirs), "samples/s", ">= 0.9")


def bench_rows(spark, rows: int, repeat: int) -> None:
    import byzerllm_spark as bls

    df = spark.range(0, rows, numPartitions=2).selectExpr(
        "id", "concat('row ', cast(id as string), ' of the benchmark table, some text to carry') as text",
        "cast(id % 1000 as double) * 0.5 as x")
    df = df.cache()
    df.count()

    def count_only(batches):  # a mapInArrow push (the Spark Connect path) with nothing sent: its ceiling
        import pyarrow as pa

        yield pa.RecordBatch.from_pydict({"n": [sum(b.num_rows for b in batches)]})

    ours, theirs, ceiling = [], [], []
    for _ in range(repeat):
        start = time.perf_counter()
        table = df.toArrow()
        theirs.append(rows / (time.perf_counter() - start))
        assert table.num_rows == rows
        del table
        start = time.perf_counter()
        assert sum(r.n for r in df.mapInArrow(count_only, "n long").collect()) == rows
        ceiling.append(rows / (time.perf_counter() - start))
        start = time.perf_counter()
        ds, servers = bls.to_ray_dataset(df)
        count = ds.count()
        ours.append(rows / (time.perf_counter() - start))
        assert count == rows
        servers.close()
    print(f"rows/s per run: data servers {[round(x) for x in ours]}, toArrow {[round(x) for x in theirs]}, "
          f"mapInArrow counting rows only {[round(x) for x in ceiling]}")
    report("mapInArrow counting rows only (ceiling of the mapInArrow fallback path)", max(ceiling), max(theirs),
           "rows/s", "information")
    report(f"Spark -> Ray dataset, {rows:,} rows, 2 partitions (best run)", max(ours), max(theirs), "rows/s", ">= 1.0")
    df.unpersist()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--copies", type=int, default=8, help=f"SFT conversations: {len(FACTS)} facts x copies")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["sft", "rows"], default=None)
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.repeat, args.epochs, args.copies = 2_000, 1, 1, 1
    return args


def run(args: argparse.Namespace, spark) -> None:
    """Every figure, on the cluster ``bls.init()`` started and ``spark``."""
    if args.only in (None, "rows"):
        bench_rows(spark, args.rows, args.repeat)
    if args.only in (None, "sft"):
        bench_sft(spark, args.repeat, args.epochs, args.threads, args.copies)


def main() -> None:
    import byzerllm_spark as bls

    args = parse_args()
    bls.init(http_port=0, include_dashboard=False)
    spark = spark_session("bench-finetune", driver_memory="4g")
    try:
        run(args, spark)
    finally:
        spark.stop()
        bls.shutdown()
    finish("bench_finetune")


if __name__ == "__main__":
    main()
