"""Test tiers: pure unit tests need nothing; `cluster` starts one embedded Ray + Serve for the
session; `spark` starts one local SparkSession for the session. Both are stopped at the end."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spark starts its Python workers with `python3` from PATH unless told otherwise; run them with
# this interpreter so they see the same packages (the README's command does not activate .venv).
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
# The library's folder (jobs, tables, caches, the local cluster record) stays inside the test run:
# nothing of the user's ~/.byzerllm_spark is read or joined, and nothing is left there.
_TEMP_HOME = None if os.environ.get("BYZERLLM_HOME") else tempfile.mkdtemp(prefix="byzerllm-tests-")
if _TEMP_HOME:
    os.environ["BYZERLLM_HOME"] = _TEMP_HOME


def pytest_sessionfinish(session, exitstatus):
    if _TEMP_HOME:
        import shutil

        shutil.rmtree(_TEMP_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster():
    import byzerllm_spark as bls

    # The dashboard hosts Ray Jobs, which detached finetune jobs use. The node is also "master" (a custom
    # resource), as the node of Byzer-LLM's finetune guide that `resource.master=0.01` pins a deploy to.
    # Another Ray on the machine (another test run) may hold the dashboard agent's fixed port: then this
    # session's agent takes a free one, or its Ray would take no jobs (see tests/_readme.py).
    from _readme import _dashboard_agent_port_if_taken

    _dashboard_agent_port_if_taken()
    info = bls.init(http_port=0, include_dashboard=True, resources={"master": 1})
    yield info
    for model in bls.list_models():
        bls.undeploy(model)
    bls.shutdown()


@pytest.fixture(scope="session")
def spark(cluster):
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("byzerllm-spark-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.memory", "2g")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def lora_adapters(spark, tmp_path_factory):
    """{name: adapter dir}: the two LoRA adapters of tests/_lora.py (made-up facts, ``bls.sft(merge=False)``),
    trained once for the session and shared by the multi-LoRA tests of the transformers and vLLM backends."""
    from _lora import train_adapters

    return train_adapters(spark, str(tmp_path_factory.mktemp("lora_jobs")))


@pytest.fixture
def deployed(cluster):
    """Deploy models for one test and always remove them afterwards."""
    import byzerllm_spark as bls

    names: list[str] = []

    def _deploy(name: str, **kwargs):
        bls.deploy(name, **kwargs)
        names.append(name)
        return name

    yield _deploy
    for name in names:
        if bls.exists(name):
            bls.undeploy(name)
