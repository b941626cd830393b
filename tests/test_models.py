"""The embedded SmolLM2-135M-Instruct served for real, on both built-in backends."""

from __future__ import annotations

import pytest

import byzerllm_spark as bls

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_transformers(cluster):
    bls.deploy("smol_tf", infer_backend="transformers", num_workers=1, cpus_per_worker=1)
    yield "smol_tf"
    bls.undeploy("smol_tf")


def test_quickstart_answer_transformers(smol_transformers):
    answer = bls.chat(smol_transformers, "What is the capital of France?", temperature=0, max_length=32)
    assert answer == "The capital of France is Paris."


def test_batch_history_system_and_metadata(smol_transformers):
    rows = bls.chat_batch(
        smol_transformers,
        [
            {"instruction": "What is the capital of France?", "temperature": "0", "max_length": "32"},
            {"instruction": "What is 2 + 2?", "temperature": 0, "max_length": 16},
            {"instruction": "What is 2 + 2?", "temperature": 0, "max_length": 16,
             "system_msg": "You are a pirate. Always answer like a pirate."},
            {"messages": [{"role": "user", "content": "My name is Zhu Weiwei."},
                          {"role": "assistant", "content": "Nice to meet you, Zhu Weiwei."},
                          {"role": "user", "content": "Repeat my name."}], "temperature": 0, "max_length": 24},
        ],
        with_metadata=True,
    )
    assert rows[0]["response"] == "The capital of France is Paris."
    assert rows[1]["response"] != rows[2]["response"]  # the system message reaches the chat template
    assert rows[2]["metadata"]["prompt_tokens"] != rows[1]["metadata"]["prompt_tokens"]
    assert "Zhu" in rows[3]["response"]
    for row in rows:
        assert row["error"] is None
        assert int(row["metadata"]["completion_tokens"]) > 0 and int(row["metadata"]["prompt_tokens"]) > 0
    # max_length bounds the new tokens.
    (short,) = bls.chat_batch(smol_transformers, [{"instruction": "Tell me a long story.", "max_length": 5,
                                                    "temperature": 0}], with_metadata=True)
    assert int(short["metadata"]["completion_tokens"]) <= 5 and short["metadata"]["finish_reason"] == "length"


def test_llama_cpp_backend_serves_the_embedded_default(cluster):
    pytest.importorskip("llama_cpp")
    bls.deploy("smol_cpp", infer_backend="llama_cpp", num_workers=2, cpus_per_worker=0.5,
               infer_params={"n_ctx": "1024"})
    try:
        assert bls.chat("smol_cpp", "Which city is the capital of France?", temperature=0,
                        max_length=32) == "The capital of France is Paris."
        rows = bls.chat_batch("smol_cpp", [{"instruction": "Say hello.", "temperature": 0, "max_length": 8}] * 4,
                              with_metadata=True)
        assert all(r["error"] is None and r["response"] for r in rows)
        assert len({r["response"] for r in rows}) == 1  # greedy: same answer on both workers
        assert bls.stat("smol_cpp")["total_workers"] == 2
    finally:
        bls.undeploy("smol_cpp")


def test_llama_cpp_rejects_unknown_params(cluster):
    pytest.importorskip("llama_cpp")
    from byzerllm_spark.errors import DeploymentError

    with pytest.raises(DeploymentError, match="n_ctxx"):
        bls.deploy("smol_badparam", infer_backend="llama_cpp", cpus_per_worker=0.5, infer_params={"n_ctxx": "1"},
                   wait_ready_timeout=120)
    assert not bls.exists("smol_badparam")


def test_deploy_from_a_model_table(cluster, tmp_path):
    """Seed 003: a checkpoint saved as a Delta model table is deployed; workers materialise it."""
    from byzerllm_spark.backends._model_files import default_model_dir

    table = str(tmp_path / "ai_model" / "smollm2")
    version = bls.save_model_table(default_model_dir(), table, metadata={"base": "SmolLM2-135M-Instruct"})
    assert bls.model_table_history(table)[0]["metadata"] == {"base": "SmolLM2-135M-Instruct"}
    bls.deploy("smol_table", model_table=table, infer_backend="llama_cpp", cpus_per_worker=1,
               local_path_prefix=str(tmp_path / "cache"))
    try:
        info = bls.workers("smol_table")[0]
        assert info["backend"] == "llama_cpp"
        answer = bls.chat("smol_table", "Which city is the capital of France?", temperature=0, max_length=32)
        assert answer == "The capital of France is Paris."
        assert any((tmp_path / "cache").iterdir())  # materialised under the worker's local prefix
    finally:
        bls.undeploy("smol_table")
    assert version >= 0
    from byzerllm_spark.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        bls.deploy("smol_missing", model_table=str(tmp_path / "nope"))
