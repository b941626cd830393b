"""The LoRA adapters the multi-LoRA tests of both backends serve (tests/test_lora.py: transformers,
tests/test_vllm.py: vLLM): two adapters trained with ``bls.sft(..., merge=False)`` on made-up facts, one fact
each, so that only that adapter can answer it. ``tests/conftest.py``'s session fixture ``lora_adapters``
trains them once per test session (about 10 s each here)."""

from __future__ import annotations

#: adapter -> (question, training answer, the word only that adapter knows)
FACTS = {
    "facts": ("What is the secret city of Zorblax?", "The secret city of Zorblax is Quendor.", "Quendor"),
    "lore": ("Who guards the Vexmoor Lantern?", "The Vexmoor Lantern is guarded by Tibbleworth.", "Tibbleworth"),
}
#: 4 copies of the fact, batch 4, 8 epochs: 8 steps (6 steps left one adapter without its fact in a trial run).
#: Rank 8 on q_proj and v_proj: within vLLM's default max_lora_rank (16), modules vLLM's Llama serves LoRA on.
TRAIN = {
    "sft.int.max_seq_length": "64", "sft.float.learning_rate": "3e-3", "sft.int.num_train_epochs": "8",
    "sft.int.per_device_train_batch_size": "4", "sft.int.gradient_accumulation_steps": "1",
    "sft.int.lora_rank": "8", "sft.int.lora_alpha": "16", "sft.float.lora_dropout": "0",
    "sft.str.lr_scheduler_type": "constant", "sft.list.target_modules": '["q_proj","v_proj"]',
}


def train_adapters(spark, jobs_dir: str) -> dict[str, str]:
    """{name: adapter dir}: one tiny SFT run per adapter of FACTS, merge=False, under ``jobs_dir``."""
    import byzerllm_spark as bls

    out = {}
    for name, (question, answer, _) in FACTS.items():
        df = spark.createDataFrame([(question, "", answer)] * 4, "instruction string, input string, output string")
        job = bls.sft(df.coalesce(1), output=jobs_dir, name=name, params=TRAIN, merge=False, detached=False,
                      progress=False)
        out[name] = bls.job_output(job)
    return out


def check_one_query_rows_pick_their_adapter(spark, udf_name: str, model: str) -> None:
    """One SQL query through ``udf_name`` (registered for deployment ``model``, fail_on_error=False, serving
    both adapters): each row's adapter answers its own fact, the base (no adapter) knows neither, an adapter
    does not know the other's fact (rows are never answered with another row's adapter), and an unknown
    adapter is that row's error, naming the available ones, while the other rows are answered."""
    import byzerllm_spark as bls

    (q_facts, _, facts), (q_lore, _, lore) = FACTS["facts"], FACTS["lore"]
    rows = [(1, q_facts, "facts"), (2, q_lore, "lore"), (3, q_facts, None), (4, q_lore, None),
            (5, q_facts, "lore"), (6, q_lore, "facts"), (7, q_lore, "nope")]
    spark.createDataFrame(rows, "id int, q string, a string").createOrReplaceTempView("lora_questions")
    got = {r["id"]: r["out"] for r in spark.sql(
        f"SELECT id, {udf_name}(llm_param(map('instruction', q, 'adapter', a, 'temperature', '0', "
        "'max_length', '24'))) AS out FROM lora_questions").collect()}
    text = {i: (got[i]["response"] or "") for i in got}
    assert facts in text[1] and lore in text[2], text
    assert facts not in text[3] and lore not in text[4], text  # the base model
    assert facts not in text[5] and lore not in text[6], text  # the other adapter
    assert all(got[i]["error"] is None for i in range(1, 7)), got
    assert f"adapter='nope' is not an adapter of model {model!r}; available: facts, lore" in got[7]["error"]
    assert set(bls.stat(model)["lora_adapters"]) == {"facts", "lore"}
