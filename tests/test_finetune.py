"""Finetune from Spark tables, for real: local Spark, local Ray, the embedded SmolLM2.

- memorisation: LoRA SFT on made-up facts, the merged model deployed and asked from Spark SQL;
- sfft on 2 Ray Train workers (gloo), stopped after its first checkpoint and resumed;
- data servers: partitions pushed into a Ray dataset; bad input refused before training.

Detached jobs are Ray Jobs, which need Ray's dashboard. When this module is the first to start
Ray it starts it with the dashboard; when Ray already runs without one (conftest's ``cluster``
started by an earlier module), the kill/resume test uses ``detached=False`` jobs, stopped with
``cancel_job`` from another thread, and the Ray Job test is skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time

import pytest

import byzerllm_spark as bls
from byzerllm_spark.errors import ConfigError, ResourceError
from byzerllm_spark.finetune import FormatError, JobError

pytestmark = pytest.mark.slow

# Spark's Python workers must have pyarrow: run them with this interpreter.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

FACTS = [
    ("What is the name of Zorblat's pet dragon?", "Quimberly"),
    ("Which city hosts the Vexmoor Lantern Festival?", "Tallowick"),
    ("Who invented the glimmerphone?", "Odessa Fernwhistle"),
    ("What colour is the Krellian moonfruit?", "teal"),
]
#: Settings found to memorise FACTS reliably in ~10 s of CPU (README, "Tests (finetune)").
MEMORISE = {
    "sft.int.max_seq_length": "128", "sft.float.learning_rate": "2e-3", "sft.int.num_train_epochs": "3",
    "sft.int.per_device_train_batch_size": "4", "sft.int.gradient_accumulation_steps": "1",
    "sft.int.lora_rank": "16", "sft.int.lora_alpha": "32", "sft.float.lora_dropout": "0",
    "sft.str.lr_scheduler_type": "constant", "sft.list.target_modules": '["q_proj","k_proj","v_proj","o_proj"]',
}
TEXTS = [
    "The Vexmoor lantern festival is held every spring in Tallowick, where people float paper boats on the river.",
    "Zorblat keeps a small green dragon called Quimberly, which eats only roasted chestnuts and sleeps in a teapot.",
    "The glimmerphone was invented by Odessa Fernwhistle in the year 1887 in a workshop near the harbour.",
    "Krellian moonfruit is teal, tastes of mint and pear, and grows only on the northern cliffs.",
]


@pytest.fixture(scope="module")
def env(request):
    """(spark, has_job_server). Starts Ray with the dashboard when Ray is not running yet."""
    import ray

    if not ray.is_initialized():
        bls.init(http_port=0, include_dashboard=True)
    spark = request.getfixturevalue("spark")  # conftest's cluster fixture reuses the running Ray
    try:
        from byzerllm_spark.finetune.jobs import job_client

        job_client().list_jobs()
        has_job_server = True
    except Exception:
        has_job_server = False
    return spark, has_job_server


@pytest.fixture
def jobs_dir(tmp_path):
    return str(tmp_path / "jobs")


def _facts_df(spark, repeat=4):
    rows = [(q, "", a, []) for q, a in FACTS] * repeat
    return spark.createDataFrame(rows, "instruction string, input string, output string, history array<array<string>>"
                                 ).repartition(2)


def test_data_servers_push_partitions_into_a_ray_dataset(env):
    spark, _ = env
    df = spark.range(0, 10000, numPartitions=3).selectExpr("id", "cast(id * 2 as string) as s")
    ds, servers = bls.to_ray_dataset(df)
    try:
        assert servers.partitions == 3 and servers.rows == 10000
        assert ds.count() == 10000
        assert len(servers.refs()) == 3  # one block per partition, kept in partition order
        ids = sorted(r["id"] for r in ds.take_all())
        assert ids == list(range(10000))
    finally:
        servers.close()
    # Closing a pooled set drops its data and keeps the actors: the next push reuses them.
    assert servers.pooled and servers.blocks() == []
    ds2, servers2 = bls.to_ray_dataset(df.where("id < 10"))
    try:
        assert servers2.names == servers.names and servers2.set_id != servers.set_id
        assert sorted(r["id"] for r in ds2.take_all()) == list(range(10))
    finally:
        servers2.close()
    # A pooled server that died is not handed out again: the next push starts new ones.
    import ray

    ray.kill(ray.get_actor(servers2.names[0], namespace="byzerllm_spark"), no_restart=True)
    ds3, servers3 = bls.to_ray_dataset(df.where("id < 5"))
    try:
        assert servers3.names != servers2.names
        assert sorted(r["id"] for r in ds3.take_all()) == list(range(5))
    finally:
        servers3.close()


@pytest.mark.parametrize("path", ["jvm-batches", "mapInArrow"])
def test_pushed_rows_equal_to_arrow_for_every_column_type(env, monkeypatch, path):
    """Both push paths (JVM-encoded batches forwarded as they are; mapInArrow, used where the
    first is unavailable, e.g. Spark Connect) deliver what df.toArrow() gives, nulls included."""
    from byzerllm_spark.finetune import data_servers

    spark, _ = env
    if path == "mapInArrow":
        monkeypatch.setattr(data_servers, "_jvm_arrow_batches", lambda df, rows: None)
    df = spark.sql(
        "SELECT id, IF(id % 7 = 0, NULL, concat('text ', id)) AS s, timestamp_micros(id * 1000003) AS ts, "
        "array(struct(id AS a, cast(id AS string) AS b)) AS arr, map('k', cast(id AS string)) AS m, "
        "cast(id / 3 AS decimal(12, 3)) AS d, encode(cast(id AS string), 'utf-8') AS bin, id % 2 = 0 AS flag "
        "FROM range(25000)").repartition(3)
    if path == "jvm-batches":  # classic PySpark has it: a silent fallback would be a slowdown
        assert data_servers._jvm_arrow_batches(df, 10) is not None
    expected = df.toArrow().sort_by("id")
    servers, summaries = data_servers.push(df)
    try:
        assert sum(s["rows"] for s in summaries) == 25000 and not any(s["error"] for s in summaries)
        import pyarrow as pa
        import ray

        got = pa.concat_tables(ray.get(servers.refs())).sort_by("id")
        assert got.column_names == expected.column_names
        for name in expected.column_names:
            assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    finally:
        data_servers.release(servers)


def test_a_plugin_sft_train_gets_the_table_rows_through_data_servers(env, jobs_dir):
    """Seed 001: custom/<module> with sft_train(data_refs, train_params, conf) gets the table's own
    columns from the data servers, as Arrow table refs."""
    spark, _ = env
    df = spark.range(0, 3000, numPartitions=3).selectExpr("id", "concat('q', id) AS question")
    job = bls.sft(df, output=jobs_dir, name="plugin", pretrained_model_type="custom/echo",
                  params={"sft.int.max_seq_length": "64", "custom_key": "x"}, sys_conf={"k": "v"},
                  detached=False, progress=False)
    assert bls.job_status(job)["status"] == "SUCCEEDED"
    with open(os.path.join(bls.job_output(job), "echo_train.json")) as f:
        summary = json.load(f)
    assert summary["rows"] == 3000 and summary["blocks"] == 3
    assert summary["columns"] == ["id", "question"]
    assert {"localPathPrefix", "custom_key"} <= set(summary["train_params"]) and summary["conf"] == ["k"]


def test_bad_input_is_refused_before_training(env, jobs_dir):
    spark, _ = env
    before = {j["job_id"] for j in bls.list_jobs()}
    good = _facts_df(spark, 1)
    kwargs = {"output": jobs_dir, "detached": False, "progress": False}
    with pytest.raises(ConfigError, match="the training table is empty"):
        bls.sft(good.where("1 = 0"), **kwargs)
    with pytest.raises(FormatError, match="no recognised columns.*question.*alpaca: instruction, output"):
        bls.sft(spark.createDataFrame([("q", "a")], "question string, answer string"), **kwargs)
    with pytest.raises(FormatError, match="partition 0, row 1: .*output is null.*Name the dragon.*alpaca format needs"):
        bls.sft(spark.createDataFrame([("x", "Quimberly"), ("Name the dragon", None)],
                                      "instruction string, output string").coalesce(1), **kwargs)
    with pytest.raises(ConfigError, match="sft.int.max_seq_length='big'"):
        bls.sft(good, params={"sft.int.max_seq_length": "big"}, **kwargs)
    with pytest.raises(ConfigError, match="not a model"):
        bls.sft(good, model_path=jobs_dir.rsplit("/", 1)[0], **kwargs)
    with pytest.raises(ResourceError, match="num_gpus=4"):
        bls.sft(good, num_gpus=4, **kwargs)
    with pytest.raises(ResourceError, match="num_workers=64"):
        bls.sfft(spark.createDataFrame([("some text",)], "text string"), num_workers=64, **kwargs)
    with pytest.raises(ConfigError, match="deepspeedConfig"):
        bls.sfft(spark.createDataFrame([("some text",)], "text string"), deepspeed_config="{bad", **kwargs)
    if importlib.util.find_spec("deepspeed") is not None:
        with pytest.raises(ConfigError, match="train_batch_size=8 disagrees.*needs train_batch_size=2"):
            bls.sfft(spark.createDataFrame([("some text",)], "text string"),
                     params={"sfft.int.per_device_train_batch_size": "2"},
                     deepspeed_config={"train_batch_size": 8, "zero_optimization": {"stage": 1}}, **kwargs)
    assert {j["job_id"] for j in bls.list_jobs()} == before  # nothing was submitted
    assert not os.path.exists(jobs_dir)


def test_moss_and_alpaca_tables_give_the_same_training_text(env):
    """Through the executors: both tables arrive in Ray as the same chat turns."""
    from byzerllm_spark.finetune.data_servers import push, release
    from byzerllm_spark.finetune.formats import arrow_normaliser

    spark, _ = env
    alpaca = spark.createDataFrame([("Name the dragon.", "", "Quimberly", [["Who is Zorblat?", "A wizard."]])],
                                   "instruction string, input string, output string, history array<array<string>>")
    moss = spark.createDataFrame(
        [(1, [("Who is Zorblat?", "A wizard."), ("Name the dragon.", "Quimberly")])],
        "conversation_id bigint, conversation array<struct<human:string,assistant:string>>")
    turns = []
    for df, fmt in ((alpaca, "alpaca"), (moss, "moss")):
        servers, _ = push(df, transform=arrow_normaliser(fmt))
        try:
            turns.append(servers.dataset().take_all()[0]["messages"])
        finally:
            release(servers)
    assert turns[0] == turns[1]
    assert [t["role"] for t in turns[0]] == ["user", "assistant", "user", "assistant"]


def test_a_job_named_after_its_kind_keeps_one_prefix_and_plain_logs(env, jobs_dir):
    """name="sft-x" gives job id sft-x-<time>-<uuid>, not sft-sft-x-...; job_logs has no colour codes."""
    spark, has_job_server = env
    df = spark.range(0, 10, numPartitions=1).selectExpr("id", "concat('q', id) AS question")
    job = bls.sft(df, output=jobs_dir, name="sft-echo", pretrained_model_type="custom/echo",
                  detached=has_job_server, progress=False)
    bls.wait(job, timeout=300, progress=False)
    assert job.job_id.startswith("sft-echo-") and not job.job_id.startswith("sft-sft-")
    assert os.path.basename(job.output) == job.job_id
    logs = bls.job_logs(job)
    assert "running byzerllm_spark.backends.echo.sft_train" in logs and "\x1b[" not in logs


def _du(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _sql_answers(spark, udf):
    rows = spark.sql(
        f"SELECT q, {udf}(llm_param(map('instruction', q, 'temperature', '0', 'max_length', '24'))) AS a "
        "FROM ft_questions ORDER BY q").collect()
    return {r["q"]: r["a"] for r in rows}


def test_sft_memorises_facts_and_the_merged_model_answers_from_sql(env, jobs_dir):
    spark, _ = env
    job = bls.sft(_facts_df(spark), model_path=None, output=jobs_dir, name="memorise", params=MEMORISE,
                  cpus_per_worker=2, detached=False, progress=False)
    assert job.job_id.startswith("sft-memorise-")
    status = bls.job_status(job)
    assert status["status"] == "SUCCEEDED" and status["step"] == status["total_steps"] == 12
    assert status["loss"] < 1.0
    final = bls.job_output(job)
    assert os.path.isfile(os.path.join(final, "config.json"))
    assert os.path.isfile(os.path.join(job.output, "adapter", "adapter_config.json"))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(job.output, "tensorboard")))
    assert "step 12/12" in bls.job_logs(job)
    # after success the Trainer checkpoints (optimizer state) are gone; the model and adapter stay
    assert not os.path.exists(os.path.join(job.output, "checkpoints"))
    assert "removed the intermediate checkpoints" in bls.job_logs(job)

    spark.createDataFrame([(q,) for q, _ in FACTS], "q string").createOrReplaceTempView("ft_questions")
    bls.deploy("smol_ft", model_path=final, infer_backend="transformers", cpus_per_worker=1,
               udf_name="smol_ft", spark=spark)
    bls.deploy("smol_ft_base", infer_backend="transformers", cpus_per_worker=1, udf_name="smol_ft_base", spark=spark)
    try:
        tuned, base = _sql_answers(spark, "smol_ft"), _sql_answers(spark, "smol_ft_base")
    finally:
        bls.undeploy("smol_ft")
        bls.undeploy("smol_ft_base")
    for question, answer in FACTS:
        assert answer.lower() in tuned[question].lower(), (question, tuned[question])
        assert answer.lower() not in base[question].lower(), (question, base[question])


def _first_checkpoint(job, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = bls.job_status(job)
        if status.get("epoch_losses"):
            return status
        assert status["status"] not in ("FAILED", "SUCCEEDED"), status
        time.sleep(1)
    raise AssertionError(f"no checkpoint after {timeout}s: {bls.job_status(job)}")


def test_sfft_with_a_deepspeed_config_trains_under_deepspeed(env, jobs_dir):
    """deepspeedConfig: ZeRO stage 1 on 2 CPU workers (gloo); DeepSpeed writes its own checkpoint."""
    pytest.importorskip("deepspeed")  # scripts/setup.sh installs it (DS_BUILD_OPS=0, no CUDA)
    spark, _ = env
    df = spark.createDataFrame([(t,) for t in TEXTS * 4], "text string").repartition(2)
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
              "zero_optimization": {"stage": 1}}
    job = bls.sfft(df, output=jobs_dir, name="deepspeed", num_workers=2, detached=False, progress=False,
                   deepspeed_config=json.dumps(config),
                   params={"sfft.int.max_length": "32", "sfft.int.num_train_epochs": "2",
                           "sfft.int.per_device_train_batch_size": "2", "sfft.bool.keep_checkpoints": "true"})
    status = bls.job_status(job)
    assert status["status"] == "SUCCEEDED"
    assert len(status["epoch_losses"]) == 2 and status["epoch_losses"][1] < status["epoch_losses"][0]
    assert os.path.isdir(os.path.join(status["last_checkpoint"], "deepspeed"))  # the engine's own state
    assert os.path.exists(os.path.join(bls.job_output(job), "model.safetensors"))


def test_sfft_two_workers_killed_after_a_checkpoint_and_resumed(env, jobs_dir):
    spark, has_job_server = env
    df = spark.createDataFrame([(t,) for t in TEXTS * 4], "text string").repartition(2)
    params = {"sfft.int.max_length": "32", "sfft.float.learning_rate": "1e-4", "sfft.int.num_train_epochs": "3",
              "sfft.int.per_device_train_batch_size": "2"}
    kwargs = dict(output=jobs_dir, name="resume", num_workers=2, params=params)
    if has_job_server:
        job = bls.sfft(df, detached=True, **kwargs)
        first = _first_checkpoint(job)
    else:
        holder: dict = {}

        def run():
            try:
                holder["job"] = bls.sfft(df, detached=False, progress=False, **kwargs)
            except JobError as exc:
                holder["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        from byzerllm_spark.finetune import _progress

        def ours():
            return [i for i in _progress.list_ids("spec") if _progress.get(i, "spec")["output"].startswith(jobs_dir)]

        deadline = time.time() + 120
        while time.time() < deadline and not ours():
            time.sleep(0.5)
        job = ours()[0]
        first = _first_checkpoint(job)
    stopped = bls.cancel_job(job)
    assert stopped["status"] in ("STOPPED", "FAILED") and stopped["phase"] in ("stopped", "failed")
    assert len(first["epoch_losses"]) >= 1
    if not has_job_server:
        thread.join(60)
        assert "error" in holder  # the waiting call saw the stop

    resumed = bls.resume_job(job, progress=False)
    status = bls.wait(resumed, timeout=300, progress=False)
    assert status["status"] == "SUCCEEDED"
    assert status["resumed_from"].endswith("checkpoint_epoch_%04d" % (len(first["epoch_losses"]) - 1))
    assert status["start_epoch"] == len(first["epoch_losses"])
    # the loss goes on falling from where the first run stopped
    assert status["epoch_losses"][-1] < first["epoch_losses"][0]
    assert os.path.isfile(os.path.join(bls.job_output(resumed), "config.json"))
    # success removes the epoch checkpoints (weights + AdamW state, 1.6 GB of a 2.1 GB output before)
    assert not os.path.exists(os.path.join(resumed.output, "ray_train"))
    assert _du(resumed.output) < 1.1 * _du(bls.job_output(resumed)) + (10 << 20)
    if has_job_server:
        logs = bls.job_logs(resumed)
        assert "resumed from" in logs and "\x1b[" not in logs
