"""The `byzerllm` command (seed 002) against the session's running cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import byzerllm_spark as bls

pytestmark = pytest.mark.slow


def _cli(*args: str) -> str:
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    out = subprocess.run([sys.executable, "-m", "byzerllm_spark.cli", *args], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_cli_deploy_stat_chat_undeploy(cluster):
    address = cluster.ray_address
    out = _cli("deploy", "--ray_address", address, "--pretrained_model_type", "custom/echo",
               "--cpus_per_worker", "0.1", "--num_workers", "2", "--model", "cli_echo",
               "--infer_params", "echo_prefix=cli: ", "saas.api_key=sk-cli-secret-777")
    assert "deployed 'cli_echo'" in out and "sk-cli-secret-777" not in out
    assert bls.exists("cli_echo")  # the deployment outlives the command
    stat = json.loads(_cli("stat", "--ray_address", address, "--model", "cli_echo").split("-" * 50)[-1])
    assert stat["total_workers"] == 2 and stat["load_balance_strategy"] == "lru"
    assert "cli: hello" in _cli("chat", "--ray_address", address, "--model", "cli_echo", "--query", "hello")
    _cli("undeploy", "--ray_address", address, "--model", "cli_echo")
    assert not bls.exists("cli_echo")
