"""A real two-node cluster on one machine, for tests/test_multinode.py.

Two Linux network namespaces ("nodes" a and b) hang off a bridge on the host, each with its own
address (``10.<x>.<y>.2`` and ``.3``; the host is ``.1``), its own loopback and its own ports. Node a
runs a Ray head and a Spark standalone master; both run a Ray worker node (own raylet) and a Spark
worker, so Spark executors and Ray Serve's per-node proxies live on two hosts as they would on two
machines.

Needs root (network namespaces) and ``ip``; :func:`unavailable` says why not otherwise. Everything
started is stopped by :meth:`Cluster.stop`: every process inside the namespaces (``ip netns pids``:
what the nodes started and nothing else; ``ray stop`` would kill every Ray on the machine), then the
namespaces and the bridge.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
SPARK_HOME = Path(__import__("pyspark").__file__).parent
RAY_PORT = 6390
SPARK_PORT = 7077


def unavailable() -> str | None:
    """Why a namespace cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    probe = f"blp{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot create a network namespace: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    command = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    subprocess.run(command, check=True, capture_output=True, text=True)


class Cluster:
    """Ray head + worker node and Spark master + 2 workers in two network namespaces."""

    def __init__(self) -> None:
        tag = os.getpid() % 10000
        self.subnet = f"10.{200 + tag % 50}.{tag % 250}"
        self.host_ip = f"{self.subnet}.1"
        self.bridge = f"blbr{tag}"
        self.nodes = {"a": (f"bl{tag}a", f"{self.subnet}.2"), "b": (f"bl{tag}b", f"{self.subnet}.3")}
        self.logs = Path(tempfile.mkdtemp(prefix="byzerllm-multinode-"))
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "SPARK_HOME": str(SPARK_HOME),
                    "PYSPARK_PYTHON": sys.executable, "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self._procs: list[subprocess.Popen] = []
        self._names: list[str] = []

    @property
    def ray_address(self) -> str:
        return f"{self.nodes['a'][1]}:{RAY_PORT}"

    @property
    def spark_master(self) -> str:
        return f"spark://{self.nodes['a'][1]}:{SPARK_PORT}"

    def start(self) -> "Cluster":
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for name, (ns, address) in self.nodes.items():
            _ip("netns", "add", ns)
            _ip("link", "add", f"v{ns}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", f"v{ns}", "master", self.bridge)
            _ip("link", "set", f"v{ns}", "up")
            _ip("addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        head_ns, head_ip = self.nodes["a"]
        self._run(head_ns, "ray-a", [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", head_ip,
                                     "--port", str(RAY_PORT), "--num-cpus", "1", "--resources", '{"node_a": 1}',
                                     # Not /tmp/ray: its ray_current_cluster file would send every later
                                     # plain ray.init() on this machine to this (then gone) cluster.
                                     "--temp-dir", str(self.logs / "ray-a"),
                                     "--include-dashboard", "false", "--disable-usage-stats"])
        self._run(head_ns, "spark-master", [str(SPARK_HOME / "bin" / "spark-class"),
                                            "org.apache.spark.deploy.master.Master", "--host", head_ip,
                                            "--port", str(SPARK_PORT), "--webui-port", "8080"],
                  SPARK_LOCAL_IP=head_ip, SPARK_NO_DAEMONIZE="1")
        self._wait_port(head_ns, head_ip, RAY_PORT, "the Ray head")
        ns_b, ip_b = self.nodes["b"]
        self._run(ns_b, "ray-b", [str(VENV_BIN / "ray"), "start", "--block", "--address", self.ray_address,
                                  "--node-ip-address", ip_b, "--num-cpus", "1", "--resources", '{"node_b": 1}',
                                  "--temp-dir", str(self.logs / "ray-b"),
                                  "--disable-usage-stats"])
        self._wait_port(head_ns, head_ip, SPARK_PORT, "the Spark master")
        for name, (ns, address) in self.nodes.items():
            self._run(ns, f"spark-worker-{name}", [str(SPARK_HOME / "bin" / "spark-class"),
                                                   "org.apache.spark.deploy.worker.Worker", self.spark_master,
                                                   "--host", address, "--cores", "1", "--memory", "1g",
                                                   "--webui-port", "0"],
                      SPARK_LOCAL_IP=address, SPARK_WORKER_DIR=str(self.logs / f"work-{name}"))
        self.wait_log("ray-b", "Ray runtime started")  # node b's raylet is up: a driver may run there
        return self

    def _run(self, ns: str, name: str, command: list[str], **env: str) -> None:
        log = open(self.logs / f"{name}.log", "w")
        self._names.append(name)
        self._procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *command], env={**self.env, **env},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def _wait_port(self, ns: str, address: str, port: int, what: str, seconds: float = 120) -> None:
        probe = f"import socket; socket.create_connection(({address!r}, {port}), timeout=1).close()"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe],
                              capture_output=True).returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"{what} did not listen on {address}:{port} within {seconds:g}s; logs in {self.logs}")

    def wait_log(self, name: str, text: str, seconds: float = 300) -> None:
        """Until the log of what :meth:`start` started as ``name`` says ``text``.

        Raises:
            RuntimeError: it exited, or did not say it in time; with the end of its log.
        """
        path = self.logs / f"{name}.log"
        proc = self._procs[self._names.index(name)]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            log = path.read_text(errors="replace")
            if text in log:
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) before saying {text!r}:\n{log[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not say {text!r} within {seconds:g}s:\n{path.read_text(errors='replace')[-3000:]}")

    def run_python(self, node: str, script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``python script args`` on a node (inside its network namespace)."""
        return subprocess.run(["ip", "netns", "exec", self.nodes[node][0], sys.executable, script, *args],
                              capture_output=True, text=True, env=self.env, timeout=timeout)

    def stop(self) -> None:
        """Kill what runs in the namespaces, then remove the namespaces and the bridge."""
        for ns, _ in self.nodes.values():
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for ns, _ in self.nodes.values():
            subprocess.run(["ip", "link", "del", f"v{ns}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.logs, ignore_errors=True)
