"""SaaS backends (``saas/<vendor>``): options, retries, rate limits, usage and secrets.

Unit tests build the backend directly against a local OpenAI-compatible server; the slow ones
deploy it into Ray Serve and call it from bls.chat and Spark SQL.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from _fake_openai import FakeOpenAIServer
from byzerllm_spark.backends import registry
from byzerllm_spark.backends.saas import VENDORS, SaasBackend, SaasOptions, retry_after_seconds
from byzerllm_spark.config import DeployConfig, InferParams
from byzerllm_spark.errors import BackendNotFoundError, ConfigError
from byzerllm_spark.protocol.request import parse_request


def saas_config(kind: str = "saas/openai", *, concurrency: int = 1, gpus: float = 0, **saas) -> DeployConfig:
    params = {f"saas.{k}": v for k, v in saas.items()}
    return DeployConfig(model="m", pretrained_model_type=kind, cpus_per_worker=0.001, gpus_per_worker=gpus,
                        worker_concurrency=concurrency, infer_params=InferParams.parse(params))


@pytest.fixture(scope="module")
def upstream():
    with FakeOpenAIServer() as server:
        yield server


def run(coro):
    return asyncio.run(coro)


# ---- options ------------------------------------------------------------------------------------
def test_vendor_names_map_to_base_urls():
    opts = SaasOptions.from_config(saas_config("saas/moonshot", model="moonshot-v1-32k", api_key="k"))
    assert opts.base_url == "https://api.moonshot.cn/v1" and opts.model == "moonshot-v1-32k"
    assert SaasOptions.from_config(saas_config("saas/qianwen", model="qwen-max")).base_url.startswith(
        "https://dashscope.aliyuncs.com/compatible-mode/v1")
    for vendor in ("deepseek", "zhipu", "siliconflow", "ollama", "official_openai", "openai"):
        assert VENDORS[vendor], vendor
    # saas.base_url wins (ollama on another host, any OpenAI-compatible server)
    opts = SaasOptions.from_config(saas_config("saas/openai", model="llama3", base_url="http://10.0.0.2:11434/v1/"))
    assert opts.base_url == "http://10.0.0.2:11434/v1"


def test_unknown_vendor_lists_the_known_ones():
    with pytest.raises(BackendNotFoundError) as err:
        registry.check(saas_config("saas/nosuchvendor", model="x"))
    message = str(err.value)
    assert "unknown SaaS vendor 'nosuchvendor'" in message
    assert "saas/deepseek" in message and "saas/qianwen" in message and "saas/openai" in message


def test_bad_saas_options_name_the_key():
    with pytest.raises(ConfigError, match="saas.model"):
        registry.check(saas_config("saas/deepseek"))
    with pytest.raises(ConfigError, match="'saas.modle'.*saas.api_key"):
        registry.check(saas_config(model="m", modle="typo"))
    with pytest.raises(ConfigError, match="saas.qps='fast'"):
        registry.check(saas_config(model="m", qps="fast"))
    with pytest.raises(ConfigError, match="saas.max_retries='-1'"):
        registry.check(saas_config(model="m", max_retries="-1"))
    with pytest.raises(ConfigError, match="saas.base_url"):
        registry.check(saas_config("saas/azure_openai", model="gpt-4o"))
    with pytest.raises(ConfigError, match="gpus_per_worker"):
        registry.check(saas_config(model="m", gpus=1))
    assert registry.check(saas_config(model="m", qps="2.5", max_retries="3", timeout="10")) == "saas/openai"


def test_options_and_configs_never_show_the_key():
    key = f"sk-{uuid.uuid4().hex}"
    config = saas_config(model="m", api_key=key, headers='{"api-key": "%s"}' % key)
    opts = SaasOptions.from_config(config)
    assert opts.api_key == key
    for text in (repr(opts), repr(config), repr(config.infer_params), str(config)):
        assert key not in text
    with pytest.raises(ConfigError) as err:
        SaasOptions.from_config(saas_config(model="m", headers=f"not json {key}"))
    assert key not in str(err.value)


def test_retry_after_header_forms():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after_seconds({"retry-after": date}) <= 31
    assert retry_after_seconds({}) is None and retry_after_seconds({"retry-after": "soon"}) is None


# ---- the backend against a local server ---------------------------------------------------------
def test_chat_sends_key_and_reports_usage(upstream):
    key = f"sk-{uuid.uuid4().hex}"
    backend = SaasBackend(saas_config(model="gpt-x", api_key=key, base_url=upstream.base_url), None)
    req = parse_request({"instruction": "hello there", "system_msg": "be brief", "temperature": "0",
                         "generation.seed": "7"})
    (result,) = run(backend.chat_batch([req]))
    assert result.error is None and result.response == "re: hello there"
    assert result.metadata["prompt_tokens"] == "4" and result.metadata["completion_tokens"] == "3"
    assert result.metadata["finish_reason"] == "stop" and result.metadata["retries"] == "0"
    assert upstream.state["auth"][-1] == f"Bearer {key}"
    sent = upstream.state["bodies"][-1]
    assert sent["model"] == "gpt-x" and sent["temperature"] == 0 and sent["seed"] == "7"
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}


def test_429_is_retried_honouring_retry_after(upstream):
    backend = SaasBackend(saas_config(model="flaky-2", base_url=upstream.base_url, backoff="0.01"), None)
    started = time.monotonic()
    (result,) = run(backend.chat_batch([parse_request({"instruction": "x"})]))
    assert result.error is None and result.response == "re: x"
    assert result.metadata["retries"] == "2"
    assert time.monotonic() - started >= 0.4  # two Retry-After: 0.2 waits, not the 0.01 s backoff


def test_5xx_backs_off_exponentially_then_the_row_gets_its_error(upstream):
    backend = SaasBackend(saas_config(model="busy-2", base_url=upstream.base_url, backoff="0.1"), None)
    started = time.monotonic()
    (result,) = run(backend.chat_batch([parse_request({"instruction": "x"})]))
    assert result.error is None and result.metadata["retries"] == "2"
    assert time.monotonic() - started >= 0.1 * 0.5 + 0.2 * 0.5  # jittered 0.1, 0.2
    backend = SaasBackend(saas_config(model="down", base_url=upstream.base_url, backoff="0.01",
                                      max_retries="2"), None)
    results = run(backend.chat_batch([parse_request({"instruction": "a"}), parse_request({"instruction": "b"})]))
    for result in results:
        assert result.response is None
        assert "HTTP 503" in result.error and "after 2 retries" in result.error and "saas.max_retries" in result.error
        assert result.metadata == {"http_status": "503", "retries": "2"}


def test_saas_backoff_sets_the_openai_clients_retry_delay(upstream):
    """saas.backoff reaches the openai client (whose own first delay is 0.5 s, then 1 s, 2 s)."""
    backend = SaasBackend(saas_config(model="busy-3", base_url=upstream.base_url, backoff="0.01"), None)
    started = time.monotonic()
    (result,) = run(backend.chat_batch([parse_request({"instruction": "x"})]))
    assert result.error is None and result.metadata["retries"] == "3"
    assert time.monotonic() - started < 1.0


def test_no_key_sends_no_authorization_not_even_from_the_environment(upstream, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    backend = SaasBackend(saas_config(model="m", base_url=upstream.base_url), None)
    (result,) = run(backend.chat_batch([parse_request({"instruction": "x"})]))
    assert result.response == "re: x" and upstream.state["auth"][-1] is None


def test_unreachable_vendor_is_a_row_error(upstream):
    backend = SaasBackend(saas_config(model="m", base_url="http://127.0.0.1:9/v1", max_retries="1",
                                      backoff="0.01", timeout="2"), None)
    (result,) = run(backend.chat_batch([parse_request({"instruction": "a"})]))
    assert result.error and "after 1 retries" in result.error and result.metadata["http_status"] == "502"


def test_errors_quoting_the_key_are_scrubbed(upstream):
    key = f"sk-{uuid.uuid4().hex}"
    backend = SaasBackend(saas_config(model="leaky", api_key=key, base_url=upstream.base_url), None)
    (result,) = run(backend.chat_batch([parse_request({"instruction": "a"})]))
    assert "HTTP 401" in result.error and "check saas.api_key" in result.error
    assert "Incorrect API key provided: Bearer ******" in result.error
    assert key not in result.error and key not in repr(backend.info())


def test_qps_spaces_requests(upstream):
    backend = SaasBackend(saas_config(model="m", base_url=upstream.base_url, qps="20"), None)
    before = len(upstream.state["times"])
    requests = [parse_request({"instruction": f"q{i}"}) for i in range(10)]
    results = run(backend.chat_batch(requests))
    assert [r.response for r in results] == [f"re: q{i}" for i in range(10)]
    times = upstream.state["times"][before:]
    assert times[-1] - times[0] >= 9 * 0.05 * 0.95  # 20 per second: 50 ms apart


def test_worker_concurrency_bounds_upstream_calls():
    with FakeOpenAIServer(latency_ms=100) as slow:
        for concurrency, lo, hi in ((1, 0.6, 5.0), (4, 0.1, 0.45)):
            backend = SaasBackend(saas_config(model="m", base_url=slow.base_url, concurrency=concurrency), None)
            started = time.monotonic()
            run(backend.chat_batch([parse_request({"instruction": "q"}) for _ in range(8)]))
            assert lo <= time.monotonic() - started <= hi, concurrency


def test_stream_and_embeddings(upstream):
    backend = SaasBackend(saas_config(model="m", base_url=upstream.base_url), None)

    async def collect():
        return [p async for p in backend.stream_chat(parse_request({"instruction": "one two three"}))]

    items = run(collect())
    pieces, last = items[:-1], items[-1]
    assert pieces == ["re:", " one", " two", " three"]
    assert last.metadata["completion_tokens"] == "4" and last.metadata["prompt_tokens"] == "3"
    embedder = SaasBackend(saas_config(model="emb", base_url=upstream.base_url, embedding="true"), None)
    assert embedder.supports_embedding and not backend.supports_embedding
    assert run(embedder.embed_batch(["ab", "abcd"])) == [[2.0, 1.0, 0.0, -1.0], [4.0, 1.0, 0.0, -1.0]]


# ---- deployed ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_deployed_saas_usage_retries_and_stat(deployed, upstream):
    import byzerllm_spark as bls

    deployed("saas_fake", pretrained_model_type="saas/official_openai", num_workers=2,
             infer_params={"saas.api_key": "sk-abc-123456789", "saas.base_url": upstream.base_url,
                           "saas.model": "gpt-fake"})
    assert bls.workers("saas_fake")[0]["backend"] == "saas/official_openai"
    rows = bls.chat_batch("saas_fake", [f"question number {i}" for i in range(6)], with_metadata=True)
    assert [r["response"] for r in rows] == [f"re: question number {i}" for i in range(6)]
    assert all(r["metadata"]["prompt_tokens"] == "3" and r["metadata"]["completion_tokens"] == "4" for r in rows)
    stat = bls.stat("saas_fake")
    assert list(stat)[-2:] == ["total_prompt_tokens", "total_completion_tokens"]
    assert stat["total_prompt_tokens"] == 18 and stat["total_completion_tokens"] == 24
    assert sum(stat["total_requests"]) == 6 and stat["total_workers"] == 2
    assert "sk-abc-123456789" not in repr(bls.deploy_config("saas_fake"))

    deployed("saas_flaky", pretrained_model_type="saas/openai",
             infer_params={"saas.base_url": upstream.base_url, "saas.model": "flaky-3", "saas.backoff": "0.01"})
    (row,) = bls.chat_batch("saas_flaky", ["hi"], with_metadata=True)
    assert row["response"] == "re: hi" and row["metadata"]["retries"] == "3"


@pytest.mark.slow
def test_spark_rows_that_still_fail_get_their_error(deployed, upstream, spark):
    import byzerllm_spark as bls

    deployed("saas_down", pretrained_model_type="saas/openai", num_workers=1,
             infer_params={"saas.base_url": upstream.base_url, "saas.model": "down", "saas.max_retries": "1",
                           "saas.backoff": "0.01"})
    deployed("saas_up", pretrained_model_type="saas/openai", num_workers=2,
             infer_params={"saas.base_url": upstream.base_url, "saas.model": "gpt-fake"})
    bls.register_model_function(spark, "saas_down", fail_on_error=False)
    bls.register_model_function(spark, "saas_up", fail_on_error=False)
    spark.createDataFrame([(f"q {i}",) for i in range(20)], "q string").createOrReplaceTempView("saas_qs")
    rows = spark.sql(
        "SELECT q, saas_down(llm_param(map('instruction', q))) AS down, "
        "saas_up(llm_param(map('instruction', q))) AS up FROM saas_qs"
    ).collect()
    assert len(rows) == 20
    for row in rows:
        assert row.down.response is None and "HTTP 503" in row.down.error
        assert row.down.metadata["http_status"] == "503"
        assert row.up.response == f"re: {row.q}" and row.up.error is None
        assert row.up.metadata["prompt_tokens"] == "2" and row.up.metadata["completion_tokens"] == "3"


@pytest.mark.slow
def test_api_key_never_leaks(deployed, upstream, spark, capfd):
    """Deploy with a unique key; use every surface; grep results, errors and the Ray session's files."""
    import ray

    import byzerllm_spark as bls
    from byzerllm_spark.errors import RequestError

    key = f"sk-leakcheck-{uuid.uuid4().hex}"
    params = {"saas.api_key": key, "saas.base_url": upstream.base_url, "saas.model": "leaky"}
    deployed("saas_leaky", pretrained_model_type="saas/openai", infer_params=params)
    deployed("saas_keyed", pretrained_model_type="saas/openai", infer_params={**params, "saas.model": "gpt-fake"})
    seen: list[str] = []
    seen.append(repr(bls.stat("saas_leaky")) + repr(bls.workers("saas_leaky")) + repr(bls.list_models()))
    seen.append(repr(bls.deploy_config("saas_leaky")) + str(bls.deploy_config("saas_leaky").infer_params))
    seen.append(repr(bls.chat_batch("saas_leaky", ["a", "b"], with_metadata=True)))
    with pytest.raises(RequestError) as err:
        bls.chat("saas_leaky", "x")
    seen.append(str(err.value))
    assert "Bearer ******" in str(err.value)
    with pytest.raises(RequestError) as err:
        list(bls.stream_chat("saas_leaky", "x"))
    seen.append(str(err.value))
    assert bls.chat("saas_keyed", "fine") == "re: fine"
    assert "".join(bls.stream_chat("saas_keyed", "fine")) == "re: fine"
    import requests

    seen.append(requests.post(f"{bls.endpoint()}/v1/chat/completions", timeout=60,
                              json={"model": "saas_leaky", "messages": [{"role": "user", "content": "x"}]}).text)
    seen.append(requests.get(f"{bls.endpoint()}/saas_leaky/info", timeout=60).text)
    bls.register_model_function(spark, "saas_leaky", fail_on_error=False)
    spark.createDataFrame([("q",)], "q string").createOrReplaceTempView("leak_qs")
    (row,) = spark.sql("SELECT saas_leaky(llm_param(map('instruction', q))) AS r FROM leak_qs").collect()
    seen.append(repr(row))
    assert "HTTP 401" in row.r.error
    out, errout = capfd.readouterr()
    seen += [out, errout]
    for text in seen:
        assert key not in text
    assert upstream.state["auth"][-1] == f"Bearer {key}"  # it was sent, where it belongs

    time.sleep(2)  # let Ray flush worker logs
    session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    leaked, scanned, mentions = [], 0, 0
    for root, _dirs, files in os.walk(session_dir):
        for name in files:
            path = os.path.join(root, name)
            try:
                if not os.path.isfile(path) or os.path.getsize(path) > 200_000_000:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            scanned += 1
            mentions += b"saas_leaky" in data
            if key.encode() in data:
                leaked.append(path)
    assert not leaked, leaked
    assert scanned > 10 and mentions > 0, (session_dir, scanned, mentions)  # the logs of this very session


def test_vendor_auth_errors_are_answered_as_bad_gateway():
    from byzerllm_spark.errors import answer_status

    assert [answer_status(s) for s in (401, 403, 404, 407)] == [502] * 4  # the vendor's refusal, not the caller's
    assert [answer_status(s) for s in (400, 429, 503, "500")] == [400, 429, 503, 500]
    assert answer_status(None) == answer_status("x") == answer_status(200) == 500


@pytest.mark.slow
def test_vendor_401_blames_the_vendor_on_every_surface(deployed, upstream, spark):
    """The vendor refuses the deployment's saas.api_key: every surface says so, none asks the caller for
    its own bearer token, and no HTTP answer is a 401/403 (which clients read as their own credentials)."""
    import requests

    import byzerllm_spark as bls
    from byzerllm_spark.errors import RequestError

    deployed("saas_refused", pretrained_model_type="saas/openai",
             infer_params={"saas.api_key": "sk-wrong", "saas.base_url": upstream.base_url, "saas.model": "leaky"})
    messages: list[str] = []
    for call in (lambda: bls.chat("saas_refused", "x"), lambda: list(bls.stream_chat("saas_refused", "x"))):
        with pytest.raises(RequestError) as err:
            call()
        messages.append(str(err.value))
    bls.register_model_function(spark, "saas_refused", fail_on_error=False)
    (row,) = spark.sql("SELECT saas_refused(llm_param(map('instruction', 'x'))) AS r").collect()
    messages.append(row.r.error)
    url = bls.endpoint() + "/v1"
    chat = {"model": "saas_refused", "messages": [{"role": "user", "content": "x"}]}
    for path, body in (("/chat/completions", chat), ("/chat/completions", {**chat, "stream": True}),
                       ("/completions", {"model": "saas_refused", "prompt": "x"})):
        resp = requests.post(url + path, json=body, timeout=60)
        assert resp.status_code == 502, (path, body, resp.status_code, resp.text)
        assert resp.json()["error"]["type"] == "server_error"
        messages.append(resp.json()["error"]["message"])
    resp = requests.post(f"{bls.endpoint()}/saas_refused/stream", json={"instruction": "x"}, timeout=60)
    assert resp.status_code == 502
    messages.append(resp.text)
    for message in messages:
        assert "HTTP 401" in message and "check saas.api_key" in message and upstream.base_url in message, message
        assert "auth_token" not in message and "bearer token" not in message, message
