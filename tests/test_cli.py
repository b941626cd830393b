"""The `byzerllm` command as a user runs it, each call its own process: start -> deploy -> query ->
bls.chat from another Python process -> stop, in a temporary BYZERLLM_HOME."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap

import psutil
import pytest

from byzerllm_spark import __version__, cluster
from byzerllm_spark.cli import build_parser

TIMEOUT = 600  # per command; the machine may be shared with other Ray clusters


def byzerllm(*args: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "byzerllm_spark.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def alive(pids: list[int]) -> list[int]:
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def kill_session(sid: int) -> None:
    """Kill what is left of a process session (a test's own leftovers only)."""
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                proc.kill()
        except (OSError, psutil.Error):
            pass


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh BYZERLLM_HOME for this test and every process it starts."""
    monkeypatch.setenv("BYZERLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# Without a cluster: parsing, help, errors.

def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                yield from _all_parsers(sub)


def test_every_option_has_help_and_no_internal_words():
    for parser in _all_parsers(build_parser()):
        for action in parser._actions:
            assert action.help, (parser.prog, action.dest)
        text = parser.format_help().lower()
        assert "seed" not in text and "issue" not in text, parser.prog


def test_version():
    assert byzerllm("--version").stdout.strip() == f"byzerllm {__version__} (byzerllm-spark)"


def test_errors_are_one_line_without_traceback(home):
    usage = byzerllm("deploy", check=False)
    assert usage.returncode == 2
    assert usage.stderr.strip().splitlines() == [
        "byzerllm: error: the following arguments are required: --model (see `byzerllm deploy --help`)"
    ]
    none = byzerllm("stat", "--model", "m", check=False)
    assert none.returncode == 1 and none.stdout == ""
    (line,) = none.stderr.strip().splitlines()
    assert line.startswith("byzerllm: error: no local cluster is running on this machine: start one with `byzerllm start`")
    dead = byzerllm("list", "--ray_address", "127.0.0.1:1", check=False, timeout=60)
    assert dead.returncode == 1 and dead.stderr.startswith("byzerllm: error: --ray_address='127.0.0.1:1' is not valid")
    debug = byzerllm("stat", "--model", "m", "--debug", check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    stopped = byzerllm("stop")
    assert stopped.stdout.strip() == "no local cluster started by `byzerllm start` is running"


def test_bad_infer_params_fail_before_connecting(home):
    out = byzerllm("deploy", "--model", "m", "--ray_address", "127.0.0.1:1", "--infer_params", "oops", check=False,
                   timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "byzerllm: error: --infer_params takes KEY=VALUE pairs, got 'oops' (e.g. saas.model=qwen-max)"
    ]


def test_bad_cache_fails_before_connecting(home):
    out = byzerllm("deploy", "--model", "m", "--ray_address", "127.0.0.1:1", "--cache", "sometimes", check=False,
                   timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[0].startswith("byzerllm: error: --cache='sometimes' is not valid: pass True")


def test_submit_runs_the_environments_spark_without_activation(home):
    env = {"HOME": os.environ.get("HOME", "/tmp"), "PATH": "/usr/bin:/bin"}
    if os.environ.get("JAVA_HOME"):
        env["JAVA_HOME"] = os.environ["JAVA_HOME"]
    out = subprocess.run([sys.executable, "-m", "byzerllm_spark.cli", "submit", "--version"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    import pyspark

    assert f"version {pyspark.__version__}" in out.stdout + out.stderr
    missing = byzerllm("submit", check=False)
    assert missing.returncode == 1 and "submit needs the application to run" in missing.stderr


# With a cluster that `byzerllm start` started.

@pytest.fixture
def started(home):
    """`byzerllm start`, and always `byzerllm stop` plus a kill of anything its session left."""
    record = None
    try:
        out = byzerllm("start", "--no_dashboard", "--http_port", "0")
        assert out.stdout.startswith("started a local cluster: Ray at "), out.stdout
        record = cluster.find_local_cluster()
        assert record is not None and record.kind == cluster.STARTED
        yield record
    finally:
        if record is None:
            record = cluster._read_record(os.path.join(home, "clusters", "local.json"))
        byzerllm("stop", check=False)
        if record is not None:
            kill_session(record.pid)
        shutil.rmtree(cluster._ray_temp_dir(), ignore_errors=True)


@pytest.mark.slow
def test_start_deploy_query_chat_stop(started, home):
    assert json.loads(byzerllm("list").stdout) == []  # a second process joins it; nothing deployed yet
    again = byzerllm("start", "--no_dashboard", check=False)
    assert again.returncode == 1
    assert f"a local cluster is already running at {started.ray_address}" in again.stderr
    assert cluster.find_local_cluster() == started

    deploy = byzerllm("deploy", "--pretrained_model_type", "custom/echo", "--cpus_per_worker", "0.1",
                      "--num_workers", "2", "--model", "cli_echo",
                      "--infer_params", "echo_prefix=cli: ", "saas.api_key=sk-cli-secret-777")
    assert "deployed 'cli_echo' (2 workers) at http://127.0.0.1:" in deploy.stdout
    assert "sk-cli-secret-777" not in deploy.stdout + deploy.stderr
    pids = [p.pid for p in cluster.local_cluster_processes(started)]
    assert started.pid in pids and len(pids) > 3  # ray start, GCS, raylet, Serve, the two workers...

    query = byzerllm("query", "--model", "cli_echo", "--query", "hello")
    assert query.stdout == "cli: hello\n"
    assert "INFO" not in query.stderr and "Connecting to existing Ray cluster" not in query.stderr, query.stderr
    assert byzerllm("chat", "--model", "cli_echo", "--query", "hi").stdout == "cli: hi\n"  # the old name

    stat = json.loads(byzerllm("stat", "--model", "cli_echo").stdout)
    assert stat["total_workers"] == 2 and stat["load_balance_strategy"] == "lru"
    assert sum(stat["total_requests"]) == 2

    # A plain Python process finds the cluster by itself and reads its endpoint from it.
    joined = json.loads(python("""
        import json
        import byzerllm_spark as bls
        from byzerllm_spark import cluster
        answer = bls.chat("cli_echo", "from python")
        print(json.dumps({"answer": answer, "embedded": cluster.info().embedded, "endpoint": cluster.info().endpoint}))
    """).splitlines()[-1])
    assert joined["answer"] == "cli: from python" and joined["embedded"] is False
    assert deploy.stdout.split(" at ")[-1].startswith(joined["endpoint"] + "/cli_echo/")

    assert byzerllm("undeploy", "--model", "cli_echo").stdout == "undeployed 'cli_echo'\n"
    assert json.loads(byzerllm("list").stdout) == []

    stop = byzerllm("stop")
    assert stop.stdout.strip() == f"stopped the local cluster at {started.ray_address}"
    assert alive(pids) == [] and cluster.local_cluster_processes(started) == []
    assert not os.path.exists(started.record) and cluster.find_local_cluster() is None
    after = byzerllm("query", "--model", "cli_echo", "--query", "hello", check=False)
    assert after.returncode == 1 and "no local cluster is running" in after.stderr


EMBEDDING_DRIVER = """
import sys
import byzerllm_spark as bls
bls.init()
bls.deploy("emb_echo", pretrained_model_type="custom/echo", cpus_per_worker=0.1, infer_params={"echo_prefix": "emb: "})
print("ready", flush=True)
sys.stdin.read()  # until the test closes stdin
bls.shutdown()
"""


@pytest.mark.slow
def test_a_second_driver_joins_an_embedded_cluster(home):
    driver = subprocess.Popen([sys.executable, "-c", EMBEDDING_DRIVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert driver.stdout.readline().startswith("ready"), "the embedding driver did not start"
        record = cluster.find_local_cluster()
        assert record is not None and record.kind == cluster.EMBEDDED and record.pid == driver.pid
        out = json.loads(python("""
            import json
            import byzerllm_spark as bls
            from byzerllm_spark import cluster
            answer = bls.chat("emb_echo", "hi")
            print(json.dumps({"answer": answer, "address": cluster.info().ray_address,
                              "embedded": cluster.info().embedded}))
        """).splitlines()[-1])
        assert out == {"answer": "emb: hi", "address": record.ray_address, "embedded": False}
        driver.stdin.close()
        assert driver.wait(timeout=TIMEOUT) == 0
        assert cluster.find_local_cluster() is None and not os.path.exists(record.record)
    finally:
        if driver.poll() is None:
            driver.kill()
        kill_session(driver.pid)  # its Ray, had it not shut down
