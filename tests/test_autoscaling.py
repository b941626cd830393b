"""Autoscaling (``deploy(min_workers=, max_workers=)``): Serve adds workers under load and removes them
when idle, down to zero with ``min_workers=0``; ``stat`` follows, and no request is lost meanwhile."""

from __future__ import annotations

import threading
import time

import pytest

from byzerllm_spark.config import DeployConfig
from byzerllm_spark.errors import ConfigError

ECHO = "custom/echo"
#: Serve's defaults wait 5 s to add a worker and 60 s to remove one; these tests wait seconds.
FAST = {"upscale_delay_s": 0.5, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2,
        "metrics_interval_s": 0.5, "look_back_period_s": 2}


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {seconds:g}s: {what}")


def test_autoscaling_arguments_are_checked():
    config = DeployConfig("m", min_workers=0, max_workers=3, worker_concurrency=4)
    assert config.serve_autoscaling_config() == {
        "upscale_delay_s": 5.0, "downscale_delay_s": 60.0, "target_ongoing_requests": 4,
        "min_replicas": 0, "initial_replicas": 0, "max_replicas": 3}
    assert DeployConfig("m", max_workers=2).initial_workers == 1  # min_workers defaults to 1
    assert DeployConfig("m", num_workers=3).serve_autoscaling_config() is None
    for kwargs, words in [
        (dict(min_workers=1), "pass max_workers= too"),
        (dict(num_workers=2, max_workers=4), "not both"),
        (dict(min_workers=5, max_workers=4), "at most max_workers=4"),
        (dict(max_workers=0), "max_workers=0"),
        (dict(autoscaling_config={"downscale_delay_s": 1}), "pass max_workers="),
        (dict(max_workers=2, autoscaling_config={"max_replicas": 9}), "max_workers="),
    ]:
        with pytest.raises(ConfigError, match=words):
            DeployConfig("m", **kwargs)


def test_a_serve_key_that_does_not_exist_is_named(cluster):
    import byzerllm_spark as bls

    with pytest.raises(ConfigError, match="'downscale_delay' is not a Ray Serve AutoscalingConfig key"):
        bls.deploy("scale_bad", pretrained_model_type=ECHO, max_workers=2, autoscaling_config={"downscale_delay": 1})
    with pytest.raises(ConfigError, match="upscale_delay_s"):
        bls.deploy("scale_bad", pretrained_model_type=ECHO, max_workers=2, autoscaling_config={"upscale_delay_s": -1})
    assert not bls.exists("scale_bad")


@pytest.mark.slow
def test_load_adds_a_worker_and_idle_removes_it(deployed):
    import byzerllm_spark as bls

    deployed("scale_up", pretrained_model_type=ECHO, cpus_per_worker=0.1, min_workers=1, max_workers=2,
             infer_params={"echo_delay_ms": "200"}, autoscaling_config=FAST)
    assert bls.stat("scale_up")["total_workers"] == 1
    stop, answers, errors = threading.Event(), [], []

    def caller(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                text = f"row {i}-{n}"
                answers.append(bls.chat("scale_up", text) == text)
            except Exception as exc:  # any failure is the test's failure
                errors.append(exc)
            n += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        stat = _wait_for(lambda: (s := bls.stat("scale_up"))["total_workers"] == 2 and s, 60,
                         "a second worker under the load of 6 callers on 1 slot")
        assert stat["max_workers"] == 2 and stat["min_workers"] == 1 and stat["target_workers"] == 2
        time.sleep(2)  # both workers answer while the load lasts
        assert all(n > 0 for n in bls.stat("scale_up")["total_requests"]), bls.stat("scale_up")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    assert answers and all(answers)
    _wait_for(lambda: bls.stat("scale_up")["total_workers"] == 1, 60, "back to min_workers=1 when idle")
    assert bls.chat("scale_up", "still here") == "still here"


@pytest.mark.slow
def test_min_workers_zero_starts_none_and_the_first_request_waits_for_one(deployed):
    import byzerllm_spark as bls

    started = time.monotonic()
    deployed("scale_zero", pretrained_model_type=ECHO, cpus_per_worker=0.1, min_workers=0, max_workers=1,
             autoscaling_config=FAST)
    assert time.monotonic() - started < 30
    assert bls.stat("scale_zero")["total_workers"] == 0
    assert bls.chat("scale_zero", "wake up") == "wake up"  # waits while a worker loads
    assert bls.stat("scale_zero")["total_workers"] == 1
    _wait_for(lambda: bls.stat("scale_zero")["total_workers"] == 0, 60, "scaled to zero when idle")
    assert bls.chat("scale_zero", "again") == "again"
