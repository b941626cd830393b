"""The examples run as a user runs them: `byzerllm submit examples/spark_submit_job.py` from an environment
that is not activated (PATH without it), in a temporary BYZERLLM_HOME."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "examples", "spark_submit_job.py")
TIMEOUT = 900  # Spark + Ray start on a shared 2-core machine


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            pass
    return found


@pytest.mark.slow
def test_spark_submit_job_from_a_fresh_environment(tmp_path):
    env = {
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PATH": "/usr/bin:/bin",  # no .venv/bin: the environment is not activated
        "BYZERLLM_HOME": str(tmp_path / "home"),  # no local cluster to join: the job embeds its own Ray
    }
    for name in ("JAVA_HOME", "TMPDIR", "LANG"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    byzerllm = os.path.join(os.path.dirname(sys.executable), "byzerllm")
    command = [byzerllm, "submit", "--master", "local[2]", "--conf", "spark.ui.enabled=false", JOB]
    # Its own session: everything the job starts (the JVM, the Python driver, Ray) can be found and cleaned up.
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err[-4000:]
        answers = [line for line in out.splitlines() if " -> " in line]
        assert answers == [
            "What is the capital of France? -> echo: What is the capital of France?",
            "Name a primary colour. -> echo: Name a primary colour.",
            "What is 2 + 2? -> echo: What is 2 + 2?",
        ], out[-2000:]
        # The job shut its Ray and Spark down: nothing of its session outlives it (Ray's last
        # processes exit a few seconds after the driver).
        deadline = time.monotonic() + 60
        while session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert [p.pid for p in session_processes(proc.pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for left in session_processes(proc.pid):
            try:
                left.kill()
            except psutil.Error:
                pass
