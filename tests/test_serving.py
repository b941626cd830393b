"""Serving with real Ray Serve and real HTTP, through the echo plugin (seed 001 contract)."""

from __future__ import annotations

import os
import signal
import time

import pyarrow as pa
import pytest
import requests

import byzerllm_spark as bls
from byzerllm_spark.protocol import arrow as _arrow
from byzerllm_spark.errors import (
    BackendNotFoundError,
    ConfigError,
    DeploymentError,
    ModelNotFoundError,
    RequestError,
    ResourceError,
)

pytestmark = pytest.mark.slow
ECHO = "custom/echo"
SEED_STAT_FIELDS = [
    "total_workers", "busy_workers", "idle_workers", "load_balance_strategy", "total_requests",
    "state", "worker_max_concurrency", "workers_last_work_time",
]


def test_deploy_chat_stat_undeploy(deployed):
    deployed("echo_a", pretrained_model_type=ECHO, num_workers=2, cpus_per_worker=0.1, worker_concurrency=2,
             infer_params={"echo_prefix": "> "})
    assert bls.exists("echo_a") and "echo_a" in bls.list_models()
    assert bls.chat("echo_a", "hello") == "> hello"
    answers = bls.chat_batch("echo_a", [f"q{i}" for i in range(50)])
    assert answers == [f"> q{i}" for i in range(50)]
    stat = bls.stat("echo_a")
    assert list(stat)[: len(SEED_STAT_FIELDS)] == SEED_STAT_FIELDS  # seed 002's fields first, in order
    assert list(stat)[len(SEED_STAT_FIELDS):] == ["total_prompt_tokens", "total_completion_tokens"]
    assert stat["total_workers"] == 2 and stat["idle_workers"] == 2 and stat["busy_workers"] == 0
    assert stat["load_balance_strategy"] == "lru"
    assert stat["worker_max_concurrency"] == 2 and stat["state"] == [2, 2]
    assert sum(stat["total_requests"]) == 51
    assert all(t.endswith("s") and float(t[:-1]) >= 0 for t in stat["workers_last_work_time"])
    bls.undeploy("echo_a")
    assert not bls.exists("echo_a")


def test_plugin_contract_kwargs_history_and_system(deployed):
    deployed("echo_kw", pretrained_model_type="byzerllm_spark.backends.echo", cpus_per_worker=0.1)
    (row,) = bls.chat_batch(
        "echo_kw",
        [{"instruction": "look", "generation.image": "https://example.com/a.png", "system_msg": "sys",
          "user_role": "User", "history": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
        with_metadata=True,
    )
    assert row["response"] == "look"
    assert row["metadata"]["kw.image"] == "https://example.com/a.png"
    assert row["metadata"]["kw.system_msg"] == "sys" and row["metadata"]["kw.user_role"] == "User"
    assert row["metadata"]["history_turns"] == "2"
    # OpenAI-style messages reach the same contract.
    (row,) = bls.chat_batch(
        "echo_kw",
        [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                       {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]}],
        with_metadata=True,
    )
    assert row["response"] == "q2" and row["metadata"]["history_turns"] == "2"


def test_arrow_endpoint_contract_order_nulls_and_row_errors(deployed):
    deployed("echo_arrow", pretrained_model_type=ECHO, cpus_per_worker=0.1)
    rows = ['{"instruction": "a"}', None, '{"instruction": "b", "temperature": "hot"}', '{"instruction": "c"}']
    resp = requests.post(f"{bls.endpoint()}/echo_arrow/arrow", data=_arrow.encode_params(rows),
                         headers={"Content-Type": _arrow.CONTENT_TYPE}, timeout=30)
    assert resp.status_code == 200
    table = pa.ipc.open_stream(resp.content).read_all()
    assert table.schema.names == ["response", "error", "metadata"]
    assert table.column("response").to_pylist() == ["a", None, None, "c"]
    errors = table.column("error").to_pylist()
    assert errors[0] is None and errors[1] is None and errors[3] is None
    assert "temperature='hot'" in errors[2]
    bad = requests.post(f"{bls.endpoint()}/echo_arrow/arrow", data=b"not arrow", timeout=30)
    assert bad.status_code == 400 and "params" in bad.text
    info = requests.get(f"{bls.endpoint()}/echo_arrow/info", timeout=30).json()
    assert info["backend"] == "plugin:byzerllm_spark.backends.echo"


def test_lru_spreads_work_and_round_robin_is_reported(deployed):
    deployed("echo_lru", pretrained_model_type=ECHO, num_workers=2, cpus_per_worker=0.1)
    for i in range(20):
        bls.chat("echo_lru", f"x{i}")
    counts = bls.stat("echo_lru")["total_requests"]
    assert sum(counts) == 20 and min(counts) >= 8, counts  # LRU alternates between idle workers
    deployed("echo_rr", pretrained_model_type=ECHO, num_workers=2, cpus_per_worker=0.1, load_balance="round_robin")
    for i in range(10):
        bls.chat("echo_rr", f"x{i}")
    stat = bls.stat("echo_rr")
    assert stat["load_balance_strategy"] == "round_robin" and sum(stat["total_requests"]) == 10


def test_busy_workers_show_in_stat(deployed):
    import threading

    deployed("echo_busy", pretrained_model_type=ECHO, num_workers=2, cpus_per_worker=0.1,
             infer_params={"echo_delay_ms": "1500"})
    threads = [threading.Thread(target=bls.chat, args=("echo_busy", "slow")) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 5
    stat = bls.stat("echo_busy")
    while stat["busy_workers"] < 2 and time.time() < deadline:
        time.sleep(0.1)
        stat = bls.stat("echo_busy")
    assert stat["busy_workers"] == 2 and stat["idle_workers"] == 0 and stat["state"] == [0, 0]
    for t in threads:
        t.join()
    assert bls.stat("echo_busy")["busy_workers"] == 0


def test_second_deploy_refused_unless_reconnect(deployed):
    deployed("echo_twice", pretrained_model_type=ECHO, cpus_per_worker=0.1)
    with pytest.raises(DeploymentError, match="already deployed; pass reconnect=True"):
        bls.deploy("echo_twice", pretrained_model_type=ECHO, cpus_per_worker=0.1)
    config = bls.deploy("echo_twice", pretrained_model_type=ECHO, cpus_per_worker=0.1, reconnect=True)
    assert config.model == "echo_twice"
    assert bls.chat("echo_twice", "still here") == "still here"


def test_killed_worker_is_replaced_and_requests_still_answered(deployed):
    deployed("echo_kill", pretrained_model_type=ECHO, num_workers=2, cpus_per_worker=0.1)
    before = bls.workers("echo_kill")
    victim = before[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    answers = bls.chat_batch("echo_kill", [f"r{i}" for i in range(200)], batch_size=10)
    assert answers == [f"r{i}" for i in range(200)]
    deadline = time.time() + 60
    while time.time() < deadline:
        pids = [w["pid"] for w in bls.workers("echo_kill")]
        if len(pids) == 2 and victim not in pids:
            break
        time.sleep(0.5)
    assert len(pids) == 2 and victim not in pids, pids
    assert bls.stat("echo_kill")["total_workers"] == 2


def test_bad_deploys_fail_fast_with_clear_errors(cluster, tmp_path):
    with pytest.raises(BackendNotFoundError) as err:
        bls.deploy("bad1", infer_backend="tensorrt")
    assert "available: embedding, llama_cpp, transformers" in str(err.value)
    with pytest.raises(BackendNotFoundError) as err:
        bls.deploy("bad2", pretrained_model_type="chatglm")
    assert "custom/auto" in str(err.value) and "custom/echo" in str(err.value)
    with pytest.raises(BackendNotFoundError, match="cannot be imported"):
        bls.deploy("bad3", pretrained_model_type="custom/no_such_plugin_xyz")
    with pytest.raises(ConfigError, match="does not exist"):
        bls.deploy("bad4", model_path=str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match="not a model"):
        bls.deploy("bad5", model_path=str(tmp_path))
    started = time.monotonic()
    with pytest.raises(ResourceError, match="gpus_per_worker=1"):
        bls.deploy("bad6", gpus_per_worker=1)
    with pytest.raises(ResourceError, match="num_workers=64"):
        bls.deploy("bad7", pretrained_model_type=ECHO, num_workers=64, cpus_per_worker=1)
    assert time.monotonic() - started < 5
    with pytest.raises(ConfigError, match="sft.int.max_seq_length='many'"):
        bls.deploy("bad8", pretrained_model_type=ECHO, infer_params={"sft.int.max_seq_length": "many"})
    assert not any(bls.exists(f"bad{i}") for i in range(1, 9))


def test_wait_ready_timeout_removes_the_deployment(cluster):
    started = time.monotonic()
    with pytest.raises(DeploymentError, match="wait_ready_timeout=3s"):
        bls.deploy("echo_slow", pretrained_model_type=ECHO, cpus_per_worker=0.1,
                   infer_params={"echo_init_seconds": "60"}, wait_ready_timeout=3)
    assert time.monotonic() - started < 30
    assert not bls.exists("echo_slow")


def test_unknown_model_lists_deployed_ones(deployed):
    deployed("echo_known", pretrained_model_type=ECHO, cpus_per_worker=0.1)
    with pytest.raises(ModelNotFoundError) as err:
        bls.chat("no_such_model", "hi")
    assert "'no_such_model' is not deployed" in str(err.value) and "echo_known" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="echo_known"):
        bls.stat("no_such_model")
    with pytest.raises(ModelNotFoundError):
        bls.undeploy("no_such_model")
    with pytest.raises(RequestError, match="temperature='hot'"):
        bls.chat("echo_known", "x", temperature="hot")


def test_deploy_fails_fast_when_others_hold_the_cpus(deployed):
    """No free CPUs now: refused at once, naming the deployment that holds them (not after the timeout)."""
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    assert free >= 0.2, f"the test cluster has {free} CPUs free"
    deployed("echo_hog", pretrained_model_type=ECHO, cpus_per_worker=round(free - 0.05, 3))
    started = time.monotonic()
    with pytest.raises(ResourceError) as err:
        bls.deploy("echo_late", pretrained_model_type=ECHO, cpus_per_worker=0.5, wait_ready_timeout=300)
    assert time.monotonic() - started < 15
    assert "'echo_hog'" in str(err.value) and "cpus_per_worker=0.5" in str(err.value)
    assert not bls.exists("echo_late")


def test_chat_batch_never_drops_a_failed_row_silently(deployed):
    deployed("echo_rows", pretrained_model_type=ECHO, cpus_per_worker=0.1)
    rows = ["fine", {"instruction": "bad", "temperature": "hot"}]
    with pytest.raises(RequestError) as err:
        bls.chat_batch("echo_rows", rows)
    assert "temperature" in str(err.value)
    answers = bls.chat_batch("echo_rows", rows, with_metadata=True)
    assert answers[0]["response"] == "fine" and answers[1]["response"] is None
    assert "temperature='hot'" in answers[1]["error"]
    assert bls.chat_batch("echo_rows", rows, raise_on_error=False) == ["fine", None]
