"""infer_backend='vllm': the embedded SmolLM2 served by vLLM (its own environment, .venv-vllm, built by
scripts/setup.sh) behind a real Serve worker. One deployment for the module (a vLLM start costs about 40 s
here), serving the base model and the session's two LoRA adapters (tests/_lora.py) at once."""

from __future__ import annotations

import pytest

import byzerllm_spark as bls
from byzerllm_spark.errors import ConfigError
from _lora import FACTS, check_one_query_rows_pick_their_adapter

try:
    from byzerllm_spark.backends.vllm_backend import vllm_python

    VLLM_PYTHON = vllm_python()
except ImportError as exc:  # pragma: no cover - CI builds the environment (scripts/setup.sh)
    pytest.skip(f"no vLLM environment: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow
MODEL = "vllm_smol"
QUESTION = "What is the capital of France?"
#: Words a 135M model repeats back reliably: each SQL row asks for its own.
WORDS = ["apple", "banana", "cherry", "orange", "lemon", "grape", "mango", "peach", "melon", "plum"]


@pytest.fixture(scope="module")
def vllm_model(cluster, lora_adapters):
    """Deployed by the README's command line, run in this process (``byzerllm deploy``'s own parsing and
    deploy call; only its connect step is this session's cluster instead of `byzerllm start`'s). It carries
    one of the session's LoRA adapters (tests/_lora.py) from the start, so that one vLLM start serves every
    test here: base-model rows and LoRA rows alike (the other adapter is added by the multi-LoRA test)."""
    from byzerllm_spark import cli

    args = cli.build_parser().parse_args([
        "deploy", "--model", MODEL, "--pretrained_model_type", "custom/auto", "--infer_backend", "vllm",
        "--cpus_per_worker", "1", "--wait_ready_timeout", "1200",
        "--infer_params", "backend.max_model_len=2048",
        "--lora_adapters", f"facts={lora_adapters['facts']}", "--max_loras", "3",
    ])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_connect", lambda args: bls.cluster.info())
        cli.COMMANDS["deploy"](args)
    yield MODEL
    bls.undeploy(MODEL)


def test_quickstart_answer_usage_and_sampling(vllm_model):
    assert "Paris" in bls.chat(vllm_model, QUESTION, temperature=0, max_length=32)
    rows = bls.chat_batch(vllm_model, [
        {"instruction": QUESTION, "temperature": 0, "max_length": 32},
        {"instruction": "Tell me a long story.", "temperature": 0, "max_length": 5},
        {"instruction": "Count from 1 to 20, separated by commas.", "temperature": 0, "max_length": 60,
         "generation.stop": ["5"]},
        {"instruction": "Write a poem.", "temperature": 1.0, "top_p": 0.9, "top_k": 20, "max_length": 24,
         "generation.seed": 7},
        {"instruction": "Write a poem.", "temperature": 1.0, "top_p": 0.9, "top_k": 20, "max_length": 24,
         "generation.seed": 7},
    ], with_metadata=True)
    for row in rows:
        assert row["error"] is None, row
        assert int(row["metadata"]["prompt_tokens"]) > 0 and int(row["metadata"]["completion_tokens"]) > 0
    assert "Paris" in rows[0]["response"] and rows[0]["metadata"]["finish_reason"] == "stop"
    assert rows[1]["metadata"]["finish_reason"] == "length" and rows[1]["metadata"]["completion_tokens"] == "5"
    assert "4" in rows[2]["response"] and "5" not in rows[2]["response"]  # cut at the stop string
    assert rows[3]["response"] == rows[4]["response"]  # the same seed samples the same answer
    stat = bls.stat(vllm_model)
    assert stat["worker_max_concurrency"] == 64  # vLLM's default: it batches the rows itself


def test_unknown_engine_argument_refused_at_deploy_with_vllms_list(cluster):
    with pytest.raises(ConfigError) as err:
        bls.deploy("vllm_bad", infer_backend="vllm", infer_params={"backend.max_model_length": "2048"})
    message = str(err.value)
    assert "'backend.max_model_length'" in message
    assert "max_model_len" in message and "gpu_memory_utilization" in message and "enable_lora" in message
    assert not bls.exists("vllm_bad")


def test_sql_100_rows_each_answered_by_its_own_row(vllm_model, spark):
    bls.register_model_function(spark, vllm_model, udf_name="vllm_chat", fail_on_error=False)
    rows = [(i, WORDS[i % len(WORDS)]) for i in range(100)]
    spark.createDataFrame(rows, "id int, word string").repartition(2).createOrReplaceTempView("vllm_words")
    out = spark.sql(
        "SELECT id, word, vllm_chat(llm_param(map('instruction', concat('Repeat this word and nothing else: ', "
        "word), 'temperature', '0', 'max_length', '16'))) AS r FROM vllm_words"
    ).collect()
    assert sorted(r.id for r in out) == list(range(100))
    for row in out:
        assert row.r.error is None and row.r.response, row
        assert row.word in row.r.response.lower(), row  # the answer of this row's prompt, not another's
        assert int(row.r.metadata["completion_tokens"]) <= 16


def test_stream_through_openai_client(vllm_model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{bls.endpoint()}/v1", api_key="unused-on-loopback", max_retries=0)
    chunks = list(client.chat.completions.create(
        model=vllm_model, stream=True, stream_options={"include_usage": True}, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": QUESTION}]))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "Paris" in "".join(pieces)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 3
    # vLLM merges the tokens its server has not sent yet into one piece: a short answer from a busy
    # machine may come whole (seen here at load 30 on 2 cores), a long one comes in pieces.
    story = list(bls.stream_chat(vllm_model, "Tell me a long story about a dragon.", temperature=0, max_length=128))
    assert len(story) > 1
    assert "".join(story) == bls.chat(vllm_model, "Tell me a long story about a dragon.", temperature=0,
                                      max_length=128)


def test_response_format_through_vllms_structured_outputs(vllm_model):
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["city", "year"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    rows = bls.chat_batch(vllm_model, [
        {"instruction": f"Extract city and year: {who} moved to {city} in {year}.", "temperature": 0,
         "max_length": 48, "response_format": fmt}
        for who, city, year in (("Ana", "Lima", 1987), ("Ben", "Oslo", 2001), ("Eva", "Rome", 1964))
    ], with_metadata=True)
    for row in rows:
        assert row["error"] is None, row
        value = json.loads(row["response"])  # the worker also checked it against the schema
        assert set(value) == {"city", "year"} and isinstance(value["year"], int), value


def test_multi_lora_rows_pick_their_adapter(vllm_model, lora_adapters, spark, tmp_path):
    """The deployment's adapter (deploy's --lora_adapters, loaded as the worker started) and one added while it
    runs (bls.add_adapter: vLLM's runtime /v1/load_lora_adapter), both served by the one vLLM engine as LoRA
    requests: the same SQL query as the transformers backend's (tests/_lora.py), then an OpenAI client naming
    ``<deployment>:<adapter>``. An adapter of a rank above the server's max_lora_rank (16: deploy's adapters
    are rank 8) is refused with vLLM's reason and the fix."""
    import json
    import shutil

    import openai

    assert bls.add_adapter(vllm_model, "lore", lora_adapters["lore"]) == ["facts", "lore"]
    wide = tmp_path / "wide"
    shutil.copytree(lora_adapters["facts"], wide)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "r": 32}))
    with pytest.raises(ConfigError, match=r"(?s)vLLM did not load adapter 'wide'.*LoRA rank 32 is greater than "
                                          r"max_lora_rank 16.*backend.max_lora_rank=<rank>"):
        bls.add_adapter(vllm_model, "wide", str(wide))
    bls.register_model_function(spark, vllm_model, udf_name="vllm_lora_rows", fail_on_error=False)
    check_one_query_rows_pick_their_adapter(spark, "vllm_lora_rows", vllm_model)
    client = openai.OpenAI(base_url=f"{bls.endpoint()}/v1", api_key="unused-on-loopback", max_retries=0)
    question, _, word = FACTS["lore"]
    answer = client.chat.completions.create(model=f"{vllm_model}:lore", temperature=0, max_tokens=24,
                                            messages=[{"role": "user", "content": question}])
    assert word in answer.choices[0].message.content and answer.model == f"{vllm_model}:lore"
