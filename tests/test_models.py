"""The embedded SmolLM2-135M-Instruct served for real, on both built-in backends."""

from __future__ import annotations

import json
import time

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


def test_llama_cpp_rejects_unknown_params_at_deploy(cluster):
    """An unknown llama.cpp key fails on the driver in one paragraph, before any worker starts."""
    pytest.importorskip("llama_cpp")
    from byzerllm_spark.errors import ConfigError

    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        bls.deploy("smol_badparam", infer_backend="llama_cpp", cpus_per_worker=0.5,
                   infer_params={"backend.n_ctxx": "1"}, wait_ready_timeout=120)
    message = str(err.value)
    assert "'backend.n_ctxx' is not used by infer_backend='llama_cpp'" in message and "n_ctx, " in message
    assert "\n" not in message and "Traceback" not in message
    assert time.monotonic() - started < 30  # no worker was started and waited for
    assert not bls.exists("smol_badparam")


def test_transformers_streams_token_by_token(smol_transformers):
    """bls.stream_chat and /v1 stream=true get the answer in many pieces that join to the greedy answer."""
    import requests

    question = dict(temperature=0, max_length=20)
    whole = bls.chat(smol_transformers, "Count from one to twenty.", **question)
    pieces = list(bls.stream_chat(smol_transformers, "Count from one to twenty.", **question))
    assert len(pieces) > 1 and "".join(pieces) == whole
    body = {"model": smol_transformers, "stream": True, "temperature": 0, "max_tokens": 20,
            "messages": [{"role": "user", "content": "Count from one to twenty."}]}
    with requests.post(f"{bls.endpoint()}/v1/chat/completions", json=body, stream=True, timeout=120) as resp:
        assert resp.status_code == 200
        chunks = [json.loads(line[6:]) for line in resp.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    texts = [t for t in texts if t]
    assert len(texts) > 1 and "".join(texts) == whole


def test_chat_on_an_embedding_model_says_to_embed(cluster):
    import requests

    from byzerllm_spark.errors import RequestError

    bls.deploy("minilm_chat", infer_backend="embedding", cpus_per_worker=0.5)
    try:
        with pytest.raises(RequestError, match=r"computes embeddings, not chat answers: call bls.embed\('minilm_chat'"):
            bls.chat("minilm_chat", "a sentence")
        with pytest.raises(RequestError, match="bls.embed"):
            list(bls.stream_chat("minilm_chat", "a sentence"))
        resp = requests.post(f"{bls.endpoint()}/v1/chat/completions", timeout=60,
                             json={"model": "minilm_chat", "messages": [{"role": "user", "content": "x"}]})
        assert resp.status_code == 400 and "/v1/embeddings" in resp.json()["error"]["message"]
        assert len(bls.embed("minilm_chat", ["a sentence"])[0]) == 384  # what it is for still works
    finally:
        bls.undeploy("minilm_chat")


def test_plugin_gets_the_model_dir_it_was_deployed_with(cluster, tmp_path):
    """As in Byzer-LLM, init_model's model_dir is the deployment's model_path (localModelDir), or None."""
    import requests

    bls.deploy("echo_nodir", pretrained_model_type="echo", cpus_per_worker=0.1)  # a bare plugin name
    bls.deploy("echo_dir", pretrained_model_type="custom/echo", cpus_per_worker=0.1, localModelDir=str(tmp_path),
               infer_params={"udfName": "echo_dir", "echo_prefix": "dir: "})
    try:
        info = {m: requests.get(f"{bls.endpoint()}/{m}/info", timeout=60).json() for m in ("echo_nodir", "echo_dir")}
        assert info["echo_nodir"]["model_dir"] is None and info["echo_dir"]["model_dir"] == str(tmp_path)
        assert bls.chat("echo_dir", "hi") == "dir: hi"
        assert bls.deploy_config("echo_dir").udf_name == "echo_dir"
    finally:
        bls.undeploy("echo_nodir")
        bls.undeploy("echo_dir")


def test_deploy_from_a_model_table(cluster, tmp_path):
    """Byzer-LLM's model tables: a checkpoint saved as a Delta model table is deployed; workers materialise it."""
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
