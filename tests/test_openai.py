"""The OpenAI-compatible API (``{endpoint}/v1``), used through the official ``openai`` client,
a ``saas/openai`` deployment chained to another deployment's ``/v1`` and queried from Spark SQL,
``bls.stream_chat``, and the bearer token of a non-loopback endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import requests

from _fake_openai import FakeOpenAIServer
from byzerllm_spark.serving.openai import (
    OpenAIError,
    chat_params,
    completion_logprobs,
    completion_params,
    embedding_inputs,
    encode_embedding,
    responses_params,
)

ECHO = "custom/echo"


# ---- request mapping (no cluster) -------------------------------------------------------------
def test_chat_body_maps_to_llm_param():
    params = chat_params({
        "model": "m", "temperature": 0, "max_completion_tokens": 12, "seed": 3, "stop": ["\n"],
        "messages": [{"role": "developer", "content": "sys"},
                     {"role": "user", "content": [{"type": "text", "text": "what is"},
                                                  {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}],
    })
    assert params == {
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "what is"}],
        "generation.image": "http://x/a.png", "temperature": 0, "max_tokens": 12,
        "generation.seed": 3, "generation.stop": ["\n"],
    }
    for bad, param in (({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                       ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
                       ({"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True}, "n"),
                       ({"messages": [{"role": "user", "content": "x"}], "functions": [{}]}, "functions"),
                       ({"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "a"}}, "audio"),
                       ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
                       ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
                        "top_logprobs"),
                       ({"messages": [{"role": "user", "content": "x"}], "seed": "7"}, "seed"),
                       ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice")):
        with pytest.raises(OpenAIError) as err:
            chat_params(bad)
        assert err.value.status == 400 and err.value.param == param
    # null is "not set"; tools and logprobs go to the engine, which honours or refuses them
    user = [{"role": "user", "content": "x"}]
    assert chat_params({"messages": user, "n": None, "stop": None, "seed": None, "logprobs": None, "tools": None,
                        "audio": None, "temperature": None}) == {"messages": user}
    assert chat_params({"messages": user, "logprobs": True, "top_logprobs": 2, "tools": [{"type": "function"}],
                        "n": 2}) == {"messages": user, "generation.logprobs": True, "generation.top_logprobs": 2,
                                     "generation.tools": [{"type": "function"}]}
    assert completion_params({"prompt": "a", "logprobs": 3}) == [
        {"instruction": "a", "generation.logprobs": True, "generation.top_logprobs": 3}]
    for bad, param in (({"prompt": "a", "echo": True}, "echo"), ({"prompt": "a", "best_of": 3}, "best_of"),
                       ({"prompt": "a", "logprobs": 6}, "logprobs")):
        with pytest.raises(OpenAIError) as err:
            completion_params(bad)
        assert err.value.status == 400 and err.value.param == param
    assert completion_params({"prompt": ["a", "b"], "max_tokens": 5}) == [
        {"instruction": "a", "max_tokens": 5}, {"instruction": "b", "max_tokens": 5}]
    with pytest.raises(OpenAIError, match="token arrays"):
        completion_params({"prompt": [[1, 2]]})
    # the Responses API's body, and the completions form of chat logprobs
    assert responses_params({"input": [{"role": "developer", "content": "be brief"},
                                       {"type": "message", "role": "user",
                                        "content": [{"type": "input_text", "text": "hi"}]}],
                             "instructions": "sys", "max_output_tokens": 9, "temperature": 0, "store": True,
                             "text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object"}}}}) == {
        "messages": [{"role": "system", "content": "sys"}, {"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hi"}],
        "temperature": 0, "max_tokens": 9,
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"},
                                                                   "strict": None}}}
    for bad, param in (({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
                       ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
                       ({"input": [{"type": "function_call_output", "output": "1"}]}, "input"),
                       ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
                       ({"input": "x", "max_tokens": 3}, "max_tokens")):
        with pytest.raises(OpenAIError) as err:
            responses_params(bad)
        assert err.value.status == 400 and err.value.param == param
    assert completion_logprobs([{"token": "Pa", "logprob": -0.5, "top_logprobs": [{"token": "Pa", "logprob": -0.5}]},
                                {"token": "ris", "logprob": -0.1, "top_logprobs": []}]) == {
        "tokens": ["Pa", "ris"], "token_logprobs": [-0.5, -0.1], "top_logprobs": [{"Pa": -0.5}, {}],
        "text_offset": [0, 2]}
    assert embedding_inputs({"input": "x"}) == ["x"]
    assert encode_embedding([1.0, -2.5], "base64") == "AACAPwAAIMA="
    assert encode_embedding([1.0], None) == [1.0]


def test_sampling_helpers_of_engines_without_them():
    """backends/_generation: a stream joins to exactly the whole answer cut at its stop sequence, OpenAI's
    penalty formula, and bad values refused naming their parameter."""
    import random

    import torch

    from byzerllm_spark.backends import _generation as g
    from byzerllm_spark.errors import RequestRefusedError

    rng = random.Random(3)
    for text in ("  The capital is Paris. Yes  ", "a \n b\n", " x Par Paris", "  "):
        for stops in ([], ["Paris"], ["\n"], ["P", "is"]):
            for _ in range(20):
                stream, out, i, stopped = g.TextStream(stops), "", 0, False
                while i < len(text) and not stopped:
                    j = i + rng.randint(1, 4)
                    piece, stopped = stream.feed(text[i:j])
                    out, i = out + piece, j
                out += "" if stopped else stream.finish()
                assert out == g.cut_at_stop(text, stops)[0].strip()
    assert g.stop_sequences('["a", "b"]') == ["a", "b"] and g.stop_sequences(None) == []
    scores = torch.zeros(1, 4)
    ids = torch.tensor([[9, 9, 1, 1, 2]])  # a 2-token prompt, then tokens 1, 1, 2
    processor = g.PenaltyProcessor(0.5, 0.25, {3: -100.0}, torch)
    processor.start = 2
    assert processor(ids, scores).tolist() == [[0.0, -1.0, -0.75, -100.0]]
    assert g.top_logprobs({"logprobs": True}) == 0 and g.top_logprobs({}) is None
    for bad, param in (({"stop": ["a"] * 5}, "stop"), ({"presence_penalty": 3}, "presence_penalty"),
                       ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"1": 101}}, "logit_bias"),
                       ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                       ({"tools": [{"type": "function", "function": {}}], "tool_choice": "required"}, "tool_choice")):
        with pytest.raises(RequestRefusedError) as err:
            g.stop_sequences(bad.get("stop"))
            g.penalties(bad, 10)
            g.top_logprobs(bad)
            g.tool_definitions(bad)
        assert err.value.param == param and err.value.status == 400


# ---- against the cluster ----------------------------------------------------------------------
@pytest.fixture
def client(cluster):
    import openai

    import byzerllm_spark as bls

    return openai.OpenAI(base_url=f"{bls.endpoint()}/v1", api_key="unused-on-loopback", max_retries=0)


@pytest.mark.slow
def test_openai_client_chat_stream_completions_models(deployed, client):
    import openai

    import byzerllm_spark as bls

    deployed("oa_echo", pretrained_model_type=ECHO, num_workers=2, cpus_per_worker=0.1,
             infer_params={"echo_prefix": "> "})
    assert "oa_echo" in [m.id for m in client.models.list().data]
    assert "byzerllm_openai" not in bls.list_models()

    answer = client.chat.completions.create(
        model="oa_echo", temperature=0, max_tokens=16,
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}])
    assert answer.choices[0].message.content == "> hello" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop" and answer.object == "chat.completion"
    assert answer.usage.total_tokens == 0  # the echo plugin reports no usage

    chunks = list(client.chat.completions.create(
        model="oa_echo", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "streamed"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "> streamed"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and not chunks[-1].choices

    completion = client.completions.create(model="oa_echo", prompt=["one", "two"])
    assert [c.text for c in completion.choices] == ["> one", "> two"]
    assert [c.index for c in completion.choices] == [0, 1]
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="oa_echo", prompt="p", stream=True)
                       if c.choices)
    assert streamed == "> p"

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no_such_model", messages=[{"role": "user", "content": "x"}])
    assert "'no_such_model' is not deployed" in str(err.value) and "oa_echo" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="oa_echo", temperature=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="does not compute embeddings"):
        client.embeddings.create(model="oa_echo", input="x")
    # The requests went to the model's workers: stat counts them.
    assert sum(bls.stat("oa_echo")["total_requests"]) >= 5


@pytest.mark.slow
def test_embeddings_float_and_base64(deployed, client):
    import byzerllm_spark as bls

    deployed("oa_minilm", infer_backend="embedding", cpus_per_worker=0.5)
    texts = ["a cat sits on the mat", "Spark SQL calls the model"]
    expected = bls.embed("oa_minilm", texts)
    as_base64 = client.embeddings.create(model="oa_minilm", input=texts)  # the client asks for base64
    as_float = client.embeddings.create(model="oa_minilm", input=texts, encoding_format="float")
    for got in (as_base64, as_float):
        assert [d.index for d in got.data] == [0, 1]
        for vector, want in zip((d.embedding for d in got.data), expected):
            assert len(vector) == 384 and max(abs(a - b) for a, b in zip(vector, want)) < 1e-6


@pytest.mark.slow
def test_saas_openai_over_v1_from_spark_sql(deployed, spark, client):
    """The end-to-end path: Spark SQL → saas/openai deployment → HTTP {endpoint}/v1 → echo deployment."""
    import byzerllm_spark as bls

    deployed("up_echo", pretrained_model_type=ECHO, num_workers=2, cpus_per_worker=0.1,
             infer_params={"echo_prefix": "echo: "})
    deployed("via_v1", pretrained_model_type="saas/openai", num_workers=2,
             infer_params={"saas.base_url": f"{bls.endpoint()}/v1", "saas.model": "up_echo",
                           "saas.api_key": "sk-local-not-checked"})
    bls.register_model_function(spark, "via_v1")
    spark.createDataFrame([(f"question {i}",) for i in range(40)], "q string").createOrReplaceTempView("v1_qs")
    rows = spark.sql("SELECT q, via_v1(llm_param(map('instruction', q))) AS a FROM v1_qs").collect()
    assert len(rows) == 40 and all(row.a == f"echo: {row.q}" for row in rows)
    assert sum(bls.stat("up_echo")["total_requests"]) == 40 and sum(bls.stat("via_v1")["total_requests"]) == 40
    # and the chained deployment is itself on /v1
    answer = client.chat.completions.create(model="via_v1", messages=[{"role": "user", "content": "twice"}])
    assert answer.choices[0].message.content == "echo: twice"


@pytest.mark.slow
def test_stream_chat_yields_pieces_and_counts_usage(deployed, client):
    import byzerllm_spark as bls
    from byzerllm_spark.errors import ModelNotFoundError, RequestError

    with FakeOpenAIServer() as upstream:
        deployed("st_saas", pretrained_model_type="saas/moonshot",
                 infer_params={"saas.base_url": upstream.base_url, "saas.model": "moonshot-v1-8k",
                               "saas.api_key": "sk-stream-test-0001"})
        pieces = list(bls.stream_chat("st_saas", "one two three", temperature=0))
        assert pieces == ["re:", " one", " two", " three"]
        stat = bls.stat("st_saas")
        assert stat["total_prompt_tokens"] == 3 and stat["total_completion_tokens"] == 4
        chunks = [c.choices[0].delta.content for c in client.chat.completions.create(
            model="st_saas", stream=True, messages=[{"role": "user", "content": "a b"}]) if c.choices]
        assert "".join(p for p in chunks if p) == "re: a b" and len([p for p in chunks if p]) == 3
        assert bls.stat("st_saas")["total_completion_tokens"] == 7
    deployed("st_echo", pretrained_model_type=ECHO, cpus_per_worker=0.1)
    assert list(bls.stream_chat("st_echo", "whole")) == ["whole"]
    with pytest.raises(RequestError, match="temperature='hot'"):
        list(bls.stream_chat("st_echo", "x", temperature="hot"))
    with pytest.raises(ModelNotFoundError, match="st_echo"):
        list(bls.stream_chat("no_such_model", "x"))


AUTH_SCRIPT = textwrap.dedent('''
    import json, os, sys, socket
    import requests
    import byzerllm_spark as bls
    from byzerllm_spark.errors import ConfigError, RequestError

    token = "tok-" + "x" * 28
    out = {}
    try:
        bls.init(http_host="0.0.0.0", http_port=0, include_dashboard=False, num_cpus=1)
    except ConfigError as exc:
        out["no_token"] = str(exc)
    os.environ.pop("BYZERLLM_AUTH_TOKEN", None)
    info = bls.init(http_host="0.0.0.0", http_port=0, include_dashboard=False, num_cpus=1, auth_token=token)
    bls.deploy("guarded", pretrained_model_type="custom/echo", cpus_per_worker=0.1)
    ep = info.endpoint
    body = {"model": "guarded", "messages": [{"role": "user", "content": "hi"}]}
    out["bare_v1"] = requests.post(ep + "/v1/chat/completions", json=body, timeout=60).status_code
    out["bare_models"] = requests.get(ep + "/v1/models", timeout=60).status_code
    out["bare_info"] = requests.get(ep + "/guarded/info", timeout=60).status_code
    out["wrong"] = requests.post(ep + "/v1/chat/completions", json=body, timeout=60,
                                 headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code
    out["good"] = requests.post(ep + "/v1/chat/completions", json=body, timeout=60,
                                headers={"Authorization": "Bearer " + token}).json()["choices"][0]["message"]["content"]
    out["chat"] = bls.chat("guarded", "via client")
    out["stream"] = "".join(bls.stream_chat("guarded", "streamed"))
    import openai
    oa = openai.OpenAI(base_url=ep + "/v1", api_key=token, max_retries=0)
    out["openai"] = oa.chat.completions.create(model="guarded", messages=body["messages"]).choices[0].message.content
    # another host's view: the proxy listens on all addresses
    ip = socket.gethostbyname(socket.gethostname())
    port = ep.rsplit(":", 1)[1]
    out["other_addr"] = requests.get(f"http://{ip}:{port}/guarded/info", timeout=60).status_code
    out["env_set_for_executors"] = os.environ.get("BYZERLLM_AUTH_TOKEN") == token
    from byzerllm_spark import transport
    transport.set_auth_token(None)
    os.environ.pop("BYZERLLM_AUTH_TOKEN")
    try:
        bls.chat("guarded", "no token")
    except RequestError as exc:
        out["client_without_token"] = str(exc)
    bls.undeploy("guarded")
    bls.shutdown()
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.slow
def test_non_loopback_bind_requires_a_token_and_401s_without_it(tmp_path):
    """In a fresh process with its own Ray: the session cluster stays on loopback without a token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BYZERLLM_AUTH_TOKEN")}
    proc = subprocess.run([sys.executable, "-c", AUTH_SCRIPT], capture_output=True, text=True, timeout=400,
                          env=env, cwd=str(tmp_path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    assert "http_host='0.0.0.0'" in out["no_token"] and "auth_token" in out["no_token"]
    assert out["bare_v1"] == 401 and out["bare_models"] == 401 and out["bare_info"] == 401 and out["wrong"] == 401
    assert out["other_addr"] == 401
    assert out["good"] == "hi" and out["chat"] == "via client" and out["stream"] == "streamed" and out["openai"] == "hi"
    assert out["env_set_for_executors"]
    assert "401" in out["client_without_token"] and "auth_token" in out["client_without_token"]
    assert "tok-xxxx" not in proc.stdout.replace(lines[-1], "") + proc.stderr


@pytest.mark.slow
def test_real_model_over_v1_reports_usage(deployed, client):
    """The embedded SmolLM2 (transformers) through the openai client: real tokens in usage and stat."""
    import byzerllm_spark as bls

    deployed("oa_smol", cpus_per_worker=1)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model="oa_smol", messages=question, temperature=0, max_tokens=24)
    assert "Paris" in answer.choices[0].message.content
    assert answer.usage.prompt_tokens > 5 and 0 < answer.usage.completion_tokens <= 24
    chunks = list(client.chat.completions.create(model="oa_smol", messages=question, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    stat = bls.stat("oa_smol")
    assert stat["total_prompt_tokens"] == 2 * answer.usage.prompt_tokens
    assert stat["total_completion_tokens"] == 2 * answer.usage.completion_tokens
