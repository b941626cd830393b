"""Answers/s of one deployment serving two LoRA adapters, rows spread over both, against all rows on one model with
an adapter merged into its weights (``merge_and_unload``, what serving an SFT result used to take): same prompts,
same run, SmolLM2 on transformers (or vLLM with ``--backend vllm``), one worker each.

The adapters are made here with PEFT (rank 16 on q/k/v/o, random weights: the cost of serving an adapter does
not depend on what it learned), so no training is timed. Every answer is exactly ``--max-length`` tokens
(``generation.min_new_tokens``), so both sides generate the same number of tokens. ``--rows`` prompts go through
``bls.chat_batch`` (the Arrow route Spark uses), alternating LoRA and merged passes ``--repeat`` times (medians);
on the LoRA side rows alternate between the two adapters, so every request holds both and the worker groups them
(one ``generate`` call per adapter and batch). Figure: answers/s with rows over 2 adapters vs all rows on the
merged model (target: ratio >= 0.8).

Usage::

    .venv/bin/python benchmarks/bench_lora.py                 # 32 rows, max_length 32, 3 repeats
    .venv/bin/python benchmarks/bench_lora.py --backend vllm  # the same on vLLM (its offline runs first, then 3 servers)
    .venv/bin/python benchmarks/bench_lora.py --smoke         # 4 rows, max_length 4, 1 repeat; baseline: the
                                                              # base model (bench_serving's worker, no merge)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from _common import add_smoke_flag, deployment, main_on_ray, report  # noqa: E402

TOPICS = ["rivers", "bread", "clocks", "glaciers", "violins", "lighthouses", "honeybees", "bridges"]


def prompts(n: int) -> list[str]:
    return [f"Write one sentence about {TOPICS[i % len(TOPICS)]} (note {i})." for i in range(n)]


def make_models(folder: str, merge: bool = True) -> tuple[dict[str, str], str | None]:
    """({adapter name: dir}, merged model dir): two random rank-16 LoRA adapters over the embedded SmolLM2, and
    the base with the first merged into its weights (None with ``merge=False``)."""
    import peft
    import torch
    import transformers

    from byzerllm_spark.backends._model_files import default_model_dir, dequantised_dir, find_gguf

    base_dir = dequantised_dir(find_gguf(default_model_dir()))  # what a transformers worker loads
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    adapters = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                               init_lora_weights=False, task_type="CAUSAL_LM")  # random B: a real change
        adapters[name] = os.path.join(folder, f"adapter_{name}")
        peft.get_peft_model(model, lora).save_pretrained(adapters[name])
    if not merge:
        return adapters, None
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = os.path.join(folder, "merged")
    peft.PeftModel.from_pretrained(base, adapters["a"]).merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    return adapters, merged


def timed(model: str, rows: list[dict]) -> float:
    """Answers/s of one pass over ``rows``; every row must be answered."""
    import byzerllm_spark as bls

    start = time.perf_counter()
    answers = bls.chat_batch(model, rows, with_metadata=True, batch_size=16)
    seconds = time.perf_counter() - start
    failed = [a["error"] for a in answers if a["error"]]
    if failed:
        raise SystemExit(f"{model}: {len(failed)} of {len(rows)} rows failed, e.g. {failed[0]}")
    return len(rows) / seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                        help="the engine of the deployments (vllm: not in --smoke; vLLM offline first, then 3 vLLM servers)")
    add_smoke_flag(parser)
    args = parser.parse_args(argv)
    if args.smoke and args.backend != "transformers":
        parser.error("--smoke measures the transformers backend only (it reuses bench_serving's worker)")
    if args.smoke:
        args.rows, args.max_length, args.repeat = 4, 4, 1
    return args


def run(args: argparse.Namespace, spark=None) -> None:
    """The figure, on the cluster ``bls.init()`` started (``spark`` is not used)."""
    folder = tempfile.mkdtemp(prefix="bench-lora-")
    try:
        # --smoke: the baseline is the base model that bench_serving's deployment already holds (run_all reuses
        # its worker); a merged model has the base model's shapes, so it costs the same per token.
        _measure(args, *make_models(folder, merge=not args.smoke))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _measure(args: argparse.Namespace, adapters: dict[str, str], merged: str | None) -> None:
    # Exactly max_length tokens per answer: each engine's own name for the floor.
    floor = "generation.min_tokens" if args.backend == "vllm" else "generation.min_new_tokens"
    base = [{"instruction": t, "max_length": args.max_length, "temperature": 0, floor: args.max_length}
            for t in prompts(args.rows)]
    spread = [{**row, "adapter": "ab"[i % 2]} for i, row in enumerate(base)]
    common = {"infer_backend": args.backend, "num_workers": 1, "cpus_per_worker": 1}
    if args.backend == "vllm":
        # Three deployments on 2 CPUs (see below); each vLLM server binds its own core whatever Ray counts, and
        # only one side works at a time.
        common.update(wait_ready_timeout=1200, cpus_per_worker=0.5)
    other, kind = ("bench_lora_merged", "merged") if merged else ("bench_smol_transformers", "base (smoke)")
    sides = [("lora", "bench_lora", spread), ("merged", other, base)]
    if args.backend == "vllm":
        _vllm_offline(args, adapters, merged)  # first: the deployments' engines must not share the CPUs with it
    with contextlib.ExitStack() as stack:
        stack.enter_context(deployment("bench_lora", lora_adapters=adapters, **common))
        stack.enter_context(deployment(other, **({"model_path": merged} if merged else {}), **common))
        if args.backend == "vllm":
            # vLLM builds LoRA into every layer when it is on: the merged model on such an engine, its rows naming
            # no adapter, tells that cost from the cost of the adapters' own work.
            stack.enter_context(deployment("bench_lora_merged_on", model_path=merged,
                                           infer_params={"backend.enable_lora": "true"}, **common))
            sides.append(("merged, LoRA on", "bench_lora_merged_on", base))
        for _, model, rows in sides:
            timed(model, rows[:4])  # warm: first calls pay one-off costs
        runs: dict[str, list[float]] = {mode: [] for mode, _, _ in sides}
        for rep in range(args.repeat):
            for mode, model, rows in sides:
                runs[mode].append(timed(model, rows))
                print(f"  run {rep + 1} {mode:15s} {runs[mode][-1]:6.2f} answers/s", flush=True)
    size = f"{args.rows} rows of {args.max_length} tokens, median of {args.repeat}"
    report(f"{args.backend}: answers/s, rows over 2 LoRA adapters vs one {kind} model ({size})",
           statistics.median(runs["lora"]), statistics.median(runs["merged"]), "answers/s", ">= 0.8")
    if "merged, LoRA on" in runs:
        report(f"{args.backend}: answers/s, the merged model on an engine with LoRA on (no adapter in the rows) vs "
               f"LoRA off ({size})", statistics.median(runs["merged, LoRA on"]), statistics.median(runs["merged"]),
               "answers/s")
        report(f"{args.backend}: answers/s, rows over 2 LoRA adapters vs the merged model on an engine with LoRA on "
               f"({size})", statistics.median(runs["lora"]), statistics.median(runs["merged, LoRA on"]), "answers/s")


def _vllm_offline(args: argparse.Namespace, adapters: dict[str, str], merged: str) -> None:
    """The engine's own figure, no serving path: vLLM's offline ``LLM.chat`` on the same prompts, rows over the two
    adapters (LoRA on) against the merged model (LoRA off), the deployments' engine arguments, best of
    ``--repeat`` each (one engine start per pass)."""
    from bench_vllm import ENGINE_ARGS, offline

    from byzerllm_spark.protocol.request import DEFAULT_TOP_P

    texts = prompts(args.rows)
    rows = [adapters["ab"[i % 2]] for i in range(len(texts))]
    runs: dict[str, list[float]] = {"lora": [], "merged": []}
    for _ in range(args.repeat):
        for mode in runs:
            engine = dict(ENGINE_ARGS, **({"enable_lora": True, "max_loras": 8} if mode == "lora" else {}))
            out = offline(texts, args.max_length, DEFAULT_TOP_P, engine, model=merged if mode == "merged" else None,
                          row_adapters=rows if mode == "lora" else None, min_tokens=args.max_length)
            runs[mode].append(len(texts) / out["seconds"])
            print(f"  offline {mode:6s} {runs[mode][-1]:6.2f} answers/s", flush=True)
    report(f"vllm offline LLM.chat: answers/s, rows over 2 LoRA adapters vs the merged model ({args.rows} rows of "
           f"{args.max_length} tokens, best of {args.repeat})", max(runs["lora"]), max(runs["merged"]), "answers/s")


def main() -> None:
    main_on_ray("bench_lora", parse_args, run)


if __name__ == "__main__":
    main()
