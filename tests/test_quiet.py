"""Quiet by default: a script that starts Ray, deploys, asks, queries from SQL and shuts down prints its
own results and nothing else; ``BYZERLLM_LOG_LEVEL=INFO`` brings Ray's and Serve's logs back.

Each script runs in a child process with a fresh ``BYZERLLM_HOME``, so it starts its own embedded cluster
instead of joining one that another process on this machine recorded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from byzerllm_spark import cluster
from byzerllm_spark.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.py")


def run_child(args: list[str], tmp_path, **env: str) -> list[str]:
    """Run ``python args...`` with the log level unset (plus ``env``); its stdout and stderr, as lines."""
    child_env = {k: v for k, v in os.environ.items() if k != "BYZERLLM_LOG_LEVEL"}
    child_env.update(BYZERLLM_HOME=str(tmp_path / "home"), PYSPARK_PYTHON=sys.executable, **env)
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=900,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, "\n".join(lines[-60:])
    return lines


def quickstart_results(lines: list[str]) -> tuple[list[str], list[str]]:
    """Split the quickstart's output into its results (the answer, the ``stat`` JSON, the model list) and
    everything else."""
    start = lines.index("{")
    end = lines.index("}", start)
    stat = json.loads("\n".join(lines[start : end + 1]))
    assert stat["total_workers"] == 2 and "total_prompt_tokens" in stat
    results = lines[start - 1 : end + 2]
    assert "Paris" in results[0] and results[-1] == "['chat'] True"
    return results, lines[: start - 1] + lines[end + 2 :]


#: The one line allowed besides the results. The first load of the embedded model on a machine writes its
#: dequantised copy with transformers' save_pretrained, which imports DeepSpeed (through accelerate), and
#: DeepSpeed warns on import that it found no GPU. Once per machine and cache folder, and the test's cache
#: folder is always new.
ALLOWED = ("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",)


@pytest.mark.slow
def test_quickstart_prints_only_its_results(tmp_path):
    lines = run_child([QUICKSTART], tmp_path)
    results, others = quickstart_results(lines)
    # Ray's and Serve's INFO lines, the token-auth notice, the replicas' progress bars and Serve's
    # "graceful_shutdown failed" retry message are all gone at the default level.
    unexpected = [line for line in others if not line.endswith(ALLOWED)]
    assert unexpected == [] and len(others) <= 1, "\n".join(others)


@pytest.mark.slow
def test_log_level_info_brings_the_logs_back(tmp_path):
    lines = run_child([QUICKSTART], tmp_path, BYZERLLM_LOG_LEVEL="INFO")
    results, others = quickstart_results(lines)
    assert len(others) >= 10, "\n".join(lines)
    text = "\n".join(others)
    assert "Started a local Ray instance" in text and "ServeController" in text


SQL_SCRIPT = textwrap.dedent(
    """
    import byzerllm_spark as bls
    from pyspark.sql import SparkSession

    # The caller's own Spark, started and warmed up before the marker: its start-up lines are Spark's.
    spark = (SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.range(1).collect()
    print("--- spark ready ---", flush=True)

    bls.init()
    bls.deploy("quiet_echo", pretrained_model_type="custom/echo", cpus_per_worker=0.25, udf_name="chat", spark=spark)
    sql = "SELECT count(chat(llm_param(map('instruction', cast(id AS string))))) AS n FROM range(3000)"
    print(spark.sql(sql).first().n, flush=True)
    bls.register_model_function(spark, "quiet_echo", udf_name="chat_rows", fail_on_error=False)
    print(spark.sql("SELECT llm_result(chat_rows(llm_param(map('instruction', 'hi')))) AS a").first().a, flush=True)
    bls.deploy("quiet_llama", infer_backend="llama_cpp", cpus_per_worker=0.5, udf_name="llama", spark=spark)
    answer = spark.sql("SELECT llama(llm_param(map('instruction', 'Say hi', 'max_length', '4'))) AS a").first().a
    print(bool(answer), flush=True)
    bls.undeploy("quiet_llama")
    bls.undeploy("quiet_echo")
    bls.shutdown()
    spark.stop()
    """
)


@pytest.mark.slow
def test_sql_query_prints_only_its_results(tmp_path):
    script = tmp_path / "sql_quiet.py"
    script.write_text(SQL_SCRIPT)
    lines = run_child([str(script)], tmp_path)
    ours = lines[lines.index("--- spark ready ---") + 1 :]
    # Registering a second model function keeps llm_param/llm_prompt/llm_result (no "replaced a previously
    # registered function" lines); with pandas < 3, PySpark has no pandas warning to give; llama.cpp loads
    # and answers without its own log.
    assert ours == ["3000", "hi", "True"], "\n".join(lines)


def test_log_level_reaches_ray_and_serve(monkeypatch):
    monkeypatch.setenv("BYZERLLM_LOG_LEVEL", "WARNING")  # restored afterwards: init(log_level=) sets it
    monkeypatch.delenv("BYZERLLM_LOG_LEVEL")
    assert cluster.serve_logging_config() == {"enable_access_log": False, "log_level": "ERROR"}
    assert cluster._quiet_workers({"env_vars": {"TQDM_DISABLE": "0", "A": "1"}}, "WARNING") == {
        "env_vars": {"TQDM_DISABLE": "0", "A": "1"}}  # the caller's own value wins
    assert cluster._quiet_workers(None, "WARNING") == {"env_vars": {"TQDM_DISABLE": "1"}}
    assert cluster._set_log_level("info") == "INFO" and os.environ["BYZERLLM_LOG_LEVEL"] == "INFO"
    assert cluster.serve_logging_config()["log_level"] == "INFO" and cluster._quiet_workers(None, "INFO") is None
    with pytest.raises(ConfigError, match="log_level='loud' is not valid"):
        cluster._set_log_level("loud")
    monkeypatch.setenv("BYZERLLM_LOG_LEVEL", "chatty")
    with pytest.raises(ConfigError, match="BYZERLLM_LOG_LEVEL"):
        cluster._set_log_level(None)
    monkeypatch.setenv("BYZERLLM_LOG_LEVEL", "WARNING")
    assert cluster._set_log_level(None) == "WARNING"
