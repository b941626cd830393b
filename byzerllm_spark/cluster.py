"""Where the models run: an embedded local Ray, an existing cluster, or Ray on Spark.

``init()`` with no arguments starts Ray in this process's machine and Ray Serve's HTTP proxy on
127.0.0.1, so a notebook or a spark-submit driver needs nothing running beforehand. Binding any
other address needs ``auth_token``: every route then requires ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import _kv, auth, transport
from .errors import ClusterError, ConfigError, bad_value
from .settings import (
    AUTH_TOKEN_ENV,
    DEFAULT_HTTP_PORT,
    KV_ENDPOINT,
    KV_FALLBACK_ENDPOINT,
    LOOPBACK_HOSTS,
    MIN_TOKEN_LENGTH,
    NAMESPACE,
    home_dir,
    home_path,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    """What ``init()`` connected to."""

    ray_address: str
    endpoint: str
    embedded: bool
    dashboard_url: str | None = None
    #: The head's proxy, for executors whose host runs no Serve proxy (with ``http_host="0.0.0.0"``
    #: the endpoint is each host's own loopback: every host but the head's with ``"HeadOnly"``, hosts
    #: without a worker with ``"EveryNode"``); else None.
    fallback_endpoint: str | None = None


_state: dict[str, Any] = {"info": None, "started_ray": False, "ray_on_spark": None}


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Quiet by default. Ray's and Serve's own messages (components starting, routes, replica counts,
# slow-start notices, Serve's shutdown retries) and the workers' progress bars describe their machinery,
# not the user's work: below INFO only their errors print. What a user can act on reaches them as this
# library's warnings and errors (a model that cannot load, resources that do not fit, a bad row).
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_VERBOSE_LEVELS = ("DEBUG", "INFO")


def _set_log_level(log_level: str | None) -> str:
    """Apply ``log_level`` (else ``$BYZERLLM_LOG_LEVEL``, default WARNING) to this library's logger."""
    from .settings import LOG_LEVEL_ENV
    from .settings import log_level as configured_level

    if log_level is not None:
        if not isinstance(log_level, str) or log_level.upper() not in _LOG_LEVELS:
            raise ConfigError(bad_value("log_level", log_level, "use 'WARNING' (default), 'INFO', 'DEBUG' or 'ERROR'"))
        # Read again by the Serve applications' logging config and by Spark's local Python workers.
        os.environ[LOG_LEVEL_ENV] = log_level.upper()
    level = configured_level()
    if level not in _LOG_LEVELS:
        raise ConfigError(bad_value(f"${LOG_LEVEL_ENV}", level, "use WARNING (the default), INFO, DEBUG or ERROR"))
    library = logging.getLogger("byzerllm_spark")
    library.setLevel(level)
    if level in _VERBOSE_LEVELS and not library.handlers and not logging.getLogger().handlers:
        library.addHandler(logging.StreamHandler())  # Python prints nothing below WARNING without a handler
    return level


def serve_logging_config() -> dict[str, Any]:
    """Serve's logging, for its controller and proxy and for our applications: no per-request access log
    (it costs more than the echo model's work); Ray's and Serve's own messages at ERROR, or at this
    library's level when that is INFO or DEBUG."""
    from .settings import log_level

    level = log_level()
    return {"enable_access_log": False, "log_level": level if level in _VERBOSE_LEVELS else "ERROR"}


def _quiet_workers(runtime_env: dict | None, level: str) -> dict | None:
    """The job's ``runtime_env`` with ``TQDM_DISABLE=1`` for its workers below INFO: a replica's stderr is
    not a terminal, and a model load's progress bars (transformers' GGUF conversion) are dozens of lines
    there. Serve applications inherit the job's runtime_env. The caller's own env_vars win."""
    if level in _VERBOSE_LEVELS:
        return runtime_env
    env = dict(runtime_env or {})
    env["env_vars"] = {"TQDM_DISABLE": "1", **(env.get("env_vars") or {})}
    return env


def init(
    ray_address: str | None = None,
    *,
    http_host: str = "127.0.0.1",
    http_port: int | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    spark: Any = None,
    ray_on_spark_workers: int | None = None,
    ray_on_spark_options: dict[str, Any] | None = None,
    include_dashboard: bool | None = None,
    runtime_env: dict | None = None,
    auth_token: str | None = None,
    log_level: str | None = None,
    resources: dict[str, float] | None = None,
    proxy_location: str = "HeadOnly",
) -> ClusterInfo:
    """Connect to (or start) Ray and Ray Serve. Safe to call twice.

    Args:
        ray_address: None joins the local cluster this library runs on this machine (``byzerllm
            start``'s, else one a plain ``init()`` embedded in another Python process), or else starts
            an embedded local Ray that later drivers join; with ``num_cpus``, ``num_gpus``,
            ``http_port``, ``include_dashboard`` or another ``http_host`` it always starts a private
            embedded Ray. ``"auto"`` or ``"ray://host:10001"`` or ``"host:6379"`` joins an existing
            cluster (Byzer-LLM's ``rayAddress``).
        http_host: address Serve's HTTP proxy binds. Keep 127.0.0.1 unless executors on other
            machines must reach it; any other address requires ``auth_token``.
        http_port: port of the proxy; None takes 8000, or a free port when 8000 is taken.
        num_cpus, num_gpus: resources of the embedded Ray (default: what the machine has).
        resources: custom resources of the embedded Ray's node, ``{"master": 1}`` (for
            ``deploy(resources=...)``, Byzer-LLM's ``resource.<node>``); default None: none.
        spark: with ``ray_on_spark_workers``, start Ray on the Spark cluster
            (``ray.util.spark.setup_ray_cluster``) and join it: the Ray head runs on the Spark driver,
            ``ray_on_spark_workers`` Ray worker nodes run inside long-running Spark tasks (each holds its
            executor's task slots, so leave slots for the queries), ``shutdown()`` stops them.
        ray_on_spark_options: further keyword arguments of ``setup_ray_cluster``, e.g.
            ``{"num_cpus_worker_node": 1, "ray_temp_root_dir": "/local_disk/ray"}``; default None.
        include_dashboard: start Ray's dashboard (needed for detached jobs); default: Ray decides.
        runtime_env: Ray runtime environment for all workers.
        auth_token: a secret of at least 16 characters (``secrets.token_urlsafe(32)``); default
            ``$BYZERLLM_AUTH_TOKEN``. When set, every HTTP route (Arrow, stream, ``/v1``) answers 401
            unless the request sends ``Authorization: Bearer <token>``; ``bls.chat`` and the Spark
            functions send it (executors read ``$BYZERLLM_AUTH_TOKEN``: on a Spark cluster set
            ``spark.executorEnv.BYZERLLM_AUTH_TOKEN``). The cluster stores only its sha256.
        log_level: ``"WARNING"`` (default; ``$BYZERLLM_LOG_LEVEL``) prints this library's warnings and
            errors and only the errors of Ray and Serve; ``"INFO"`` or ``"DEBUG"`` bring back Ray's and
            Serve's logs and the workers' progress bars. Sets ``$BYZERLLM_LOG_LEVEL`` for this process.
            Ray's and Serve's own processes take the level they were started with.
        proxy_location: where Serve runs its HTTP proxy: ``"HeadOnly"`` (default) or ``"EveryNode"``
            (Ray Serve's names). On a cluster whose Spark executors run on Ray nodes, ``"EveryNode"``
            with ``http_host="0.0.0.0"`` lets each executor reach the proxy of its own node at the
            endpoint ``http://127.0.0.1:<port>`` (the endpoint ``init`` returns). Serve runs proxies on
            the head and on the nodes that hold a worker; an executor or driver whose host has none uses
            the head's proxy (``ClusterInfo.fallback_endpoint``). Only used when this call starts Serve.

    Returns:
        ClusterInfo with the Ray address and the HTTP endpoint.

    Raises:
        ClusterError: Ray or Serve cannot be started or reached.
        ConfigError: a non-loopback ``http_host`` without a token, or a token too short.

    Example:
        >>> import byzerllm_spark as bls
        >>> bls.init()  # doctest: +SKIP
        >>> bls.init(http_host="0.0.0.0", auth_token=os.environ["BYZERLLM_AUTH_TOKEN"])  # doctest: +SKIP
    """
    import ray

    level = _set_log_level(log_level)
    token = _check_auth(http_host, auth_token)
    if proxy_location not in PROXY_LOCATIONS:
        raise ConfigError(bad_value("proxy_location", proxy_location, f"use one of {', '.join(PROXY_LOCATIONS)}"))
    if _state["info"] is not None and ray.is_initialized():
        if token:
            transport.set_auth_token(token)
        return _state["info"]

    if spark is not None and ray_on_spark_workers:
        ray_address = _start_ray_on_spark(spark, ray_on_spark_workers, ray_on_spark_options or {})
    # A plain init() shares: it joins this library's local cluster, or starts one that others join.
    # Options that shape a new Ray (as the tests and benchmarks pass) ask for a private one.
    shared = ray_address is None and http_host == "127.0.0.1" and (num_cpus, num_gpus, http_port,
                                                                    include_dashboard, resources) == (None,) * 5
    if shared:
        ray_address = _join_local()

    embedded = ray_address is None
    init_kwargs: dict[str, Any] = {
        "namespace": NAMESPACE, "ignore_reinit_error": True, "log_to_driver": True,
        "logging_level": serve_logging_config()["log_level"],
    }
    runtime_env = _quiet_workers(runtime_env, level)
    if runtime_env:
        init_kwargs["runtime_env"] = runtime_env
    if embedded:
        if num_cpus is not None:
            init_kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            init_kwargs["num_gpus"] = num_gpus
        if include_dashboard is not None:
            init_kwargs["include_dashboard"] = include_dashboard
        if resources:
            init_kwargs["resources"] = dict(resources)
        # Ray starts workers at nice 15. Model workers are the point of this cluster: at nice 15
        # they lose the CPU to Spark executors and the driver on the same machine.
        init_kwargs["_system_config"] = {"worker_niceness": 0}
    try:
        if not ray.is_initialized():
            context = ray.init(address=ray_address, **init_kwargs)
            _state["started_ray"] = embedded
        else:
            context = None
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...
        raise ClusterError(
            f"cannot start or join Ray at ray_address={ray_address!r}: {exc}. "
            "Pass None for an embedded local Ray, or the address of a running cluster."
        ) from exc

    endpoint, fallback = _start_serve(http_host, http_port, token, proxy_location)
    transport.set_auth_token(token)
    if token:
        # Spark's Python workers (local mode) inherit the driver's environment: they send it too.
        if AUTH_TOKEN_ENV not in os.environ:
            os.environ[AUTH_TOKEN_ENV] = token
            _state["set_env_token"] = True  # undone by shutdown()
    dashboard = getattr(context, "dashboard_url", None) if context is not None else None
    info = ClusterInfo(
        ray_address=ray.get_runtime_context().gcs_address,
        endpoint=endpoint,
        embedded=embedded,
        dashboard_url=f"http://{dashboard}" if dashboard else None,
        fallback_endpoint=fallback,
    )
    _state["info"] = info
    if shared and embedded and context is not None:
        _record_embedded(info.ray_address)  # now that Serve is up: other drivers join a complete cluster
    logger.info("byzerllm_spark: Ray at %s, Serve endpoint %s", info.ray_address, info.endpoint)
    return info


#: Ray Serve's proxy locations that ``init(proxy_location=)`` takes.
PROXY_LOCATIONS = ("HeadOnly", "EveryNode")


def _check_auth(http_host: str, auth_token: str | None) -> str | None:
    """The token to use (argument, else the environment); refuse an open non-loopback bind."""
    token = auth_token if auth_token is not None else os.environ.get(AUTH_TOKEN_ENV) or None
    if token is not None and (not isinstance(token, str) or len(token.strip()) < MIN_TOKEN_LENGTH
                              or token != token.strip()):
        # The value is a secret: never echo it.
        raise ConfigError(
            f"auth_token is not valid: use a string of at least {MIN_TOKEN_LENGTH} characters without "
            "surrounding spaces, e.g. secrets.token_urlsafe(32)"
        )
    if http_host not in LOOPBACK_HOSTS and not token:
        raise ConfigError(
            bad_value(
                "http_host",
                http_host,
                "the proxy binds 127.0.0.1 by default; binding another address requires a token: "
                "bls.init(http_host=..., auth_token=secrets.token_urlsafe(32)) or $BYZERLLM_AUTH_TOKEN. "
                "Requests must then send 'Authorization: Bearer <token>'",
            )
        )
    return token


auth_token = transport.auth_token


def _start_serve(http_host: str, http_port: int | None, token: str | None = None,
                 proxy_location: str = "HeadOnly") -> tuple[str, str | None]:
    """Start Serve (or find it started): ``(endpoint, fallback endpoint or None)``, see ClusterInfo."""
    from ray import serve

    # Importing ray.serve sets its driver-side logger to INFO ("Connecting to existing Serve app...").
    logging.getLogger("ray.serve").setLevel(serve_logging_config()["log_level"])
    if http_port is not None and (not isinstance(http_port, int) or not 0 <= http_port < 65536):
        raise ConfigError(bad_value("http_port", http_port, "use an integer port such as 8000, or None"))
    existing = _kv.get(KV_ENDPOINT)
    if existing is not None and _serve_running():
        required = auth.stored_digest()
        if token and required != auth.digest(token):
            raise ConfigError(
                "auth_token is not valid for this cluster: its endpoint was started "
                + ("with another token" if required else "without a token (open on loopback only)")
                + "; pass the token it was started with, or none"
            )
        fallback = _kv.get(KV_FALLBACK_ENDPOINT)
        return existing.decode(), fallback.decode() if fallback else None
    auth.publish(token)  # before any replica starts: each reads it once
    if http_port is None:
        http_port = DEFAULT_HTTP_PORT if _port_free(http_host, DEFAULT_HTTP_PORT) else _free_port(http_host)
    elif http_port == 0:
        http_port = _free_port(http_host)
    for attempt in range(3):
        try:
            serve.start(proxy_location=proxy_location, http_options={"host": http_host, "port": http_port},
                        logging_config=serve_logging_config())
            break
        except Exception as exc:
            # On a loaded machine the proxy can miss its first readiness check; Serve then
            # kills it. Starting again usually succeeds.
            if attempt == 2:
                raise ClusterError(f"cannot start Ray Serve on {http_host}:{http_port}: {exc}") from exc
            logger.warning("Serve did not start (%s); retrying", str(exc).splitlines()[0])
            time.sleep(2)
    endpoint = f"http://{'127.0.0.1' if http_host in ('0.0.0.0', 'localhost') else http_host}:{http_port}"
    fallback = None
    if http_host in ("0.0.0.0", "::"):
        import ray

        # The controller's node, the head, always runs a proxy; other nodes only with EveryNode and
        # while they hold a worker. A host without one (every host but the head's with HeadOnly) uses it.
        head_ip = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
        fallback = f"http://{head_ip}:{http_port}"
        _kv.put(KV_FALLBACK_ENDPOINT, fallback.encode())
    else:
        _kv.delete(KV_FALLBACK_ENDPOINT)  # one left by an earlier Serve of this Ray cluster
    _kv.put(KV_ENDPOINT, endpoint.encode())
    return endpoint, fallback


def _serve_running() -> bool:
    from ray import serve

    try:
        serve.status()
        return True
    except Exception:
        return False


def _start_ray_on_spark(spark: Any, workers: int, options: dict[str, Any]) -> str:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import inspect

    from ray.util.spark import setup_ray_cluster

    known = set(inspect.signature(setup_ray_cluster).parameters) - {"max_worker_nodes", "kwargs"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(bad_value("ray_on_spark_options", unknown,
                                    f"use keywords of ray.util.spark.setup_ray_cluster: {', '.join(sorted(known))}"))
    _ray_cli_on_path(spark)
    address, _ = setup_ray_cluster(max_worker_nodes=workers, **options)
    _state["ray_on_spark"] = True
    return address


def _ray_cli_on_path(spark: Any) -> None:
    """Ray on Spark starts each node with the ``ray`` command found on ``PATH`` (of the driver, and of
    the executors' Python workers); without one it fails with a bare ``TypeError``. The driver's own
    interpreter's ``bin`` is added here; executors are checked, with a clear error."""
    import shutil
    import sys

    if shutil.which("ray") is None:
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    parallelism = max(1, spark.sparkContext.defaultParallelism)
    missing = (spark.sparkContext.parallelize(range(parallelism), parallelism)
               .map(lambda _: __import__("shutil").which("ray") is None).collect())
    if any(missing):
        raise ConfigError(
            "Ray on Spark: the executors' PATH has no `ray` command, which Ray on Spark runs to start its "
            "nodes; set spark.executorEnv.PATH to include the bin folder of the executors' Python "
            f"environment (e.g. {os.path.dirname(sys.executable)}) before the SparkSession starts")


def info() -> ClusterInfo:
    """The current connection. Raises ClusterError before ``init()``."""
    if _state["info"] is None:
        raise ClusterError("byzerllm_spark is not connected: call bls.init() first")
    return _state["info"]


def is_connected() -> bool:
    """True after ``init()`` in this process (until ``shutdown()``)."""
    return _state["info"] is not None


def ensure_init() -> ClusterInfo:
    """``init()`` with defaults unless already connected (the functions call this for you)."""
    import ray

    if _state["info"] is None or not ray.is_initialized():
        _state["info"] = None
        return init()
    return _state["info"]


def endpoint() -> str:
    """Base URL of the HTTP endpoint, e.g. ``http://127.0.0.1:8000``.

    Models answer at ``{endpoint}/{model}/arrow`` (see the README's Arrow contract). With
    ``proxy_location="EveryNode"`` it is this host's own proxy, or the head's where this host runs none.
    """
    info = ensure_init()
    return transport.local_or_fallback(info.endpoint, info.fallback_endpoint)


def shutdown() -> None:
    """Stop Serve and Ray if this process started them; otherwise just disconnect."""
    import ray

    if not ray.is_initialized():
        _state["info"] = None
        return
    if _state["started_ray"]:
        # ray.shutdown() below stops every process of the embedded cluster, Serve's included. A
        # serve.shutdown() first only adds "Task ServeController.graceful_shutdown failed ... will be
        # retried": Serve's controller kills itself while that call is in flight.
        _forget_embedded()
    if _state.get("ray_on_spark"):
        from ray.util.spark import shutdown_ray_cluster

        shutdown_ray_cluster()
    ray.shutdown()
    transport.set_auth_token(None)
    if _state.pop("set_env_token", False):
        os.environ.pop(AUTH_TOKEN_ENV, None)
    _state.update(info=None, started_ray=False, ray_on_spark=None)


# A local cluster that other processes join.
#
# A second driver on this machine (a new notebook kernel, a script, the `byzerllm` command) that calls
# plain ``init()`` joins a cluster this library started here instead of starting an empty one. Each
# such cluster leaves a record in ``<home>/clusters/``: ``local.json`` for the one ``byzerllm start``
# runs (``ray start --head --block``; it outlives the command), ``embedded-<pid>.json`` for a Ray
# embedded in a Python process (it lives as long as that process). A record counts only while its
# owner process (pid and start time) is alive and the cluster's GCS port answers.

STARTED = "byzerllm start"
EMBEDDED = "embedded"
_STARTED_RECORD = "local.json"
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
#: Set in the environment of ``ray start``, which every process of that cluster inherits: ``stop`` ends
#: the processes that carry the value of its record, never a stranger that reused a pid.
_INSTANCE_ENV = "BYZERLLM_LOCAL_CLUSTER"
_START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LocalCluster:
    """A cluster on this machine, as recorded by the process that started it."""

    ray_address: str
    #: The owner: ``ray start --block`` (its session holds every process of the cluster), or the
    #: Python process that embeds Ray.
    pid: int
    #: The owner's start time (``psutil.Process.create_time``): a reused pid is not the owner.
    started: float
    kind: str  # STARTED or EMBEDDED
    host: str
    record: str
    #: ``RAY_AUTH_MODE`` of the cluster: ``"token"`` (Ray's default for a new local cluster) or not.
    ray_auth_mode: str | None = None
    log: str | None = None
    #: ``$BYZERLLM_LOCAL_CLUSTER`` of its processes (started clusters only).
    instance: str | None = None


def _records_dir() -> str:
    return home_path("clusters")


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _write_record(cluster: LocalCluster) -> None:
    os.makedirs(os.path.dirname(cluster.record), exist_ok=True)
    partial = f"{cluster.record}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as fh:
        json.dump(asdict(cluster), fh)
    os.replace(partial, cluster.record)  # readers never see half a record


def _read_record(path: str) -> LocalCluster | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return LocalCluster(**{**json.load(fh), "record": path})
    except (OSError, ValueError, TypeError):
        return None


def _remove_record(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _alive(cluster: LocalCluster) -> bool:
    started = _process_start(cluster.pid)
    if started is None or abs(started - cluster.started) > 1:
        return False
    host, _, port = cluster.ray_address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        return False
    return True


def find_local_cluster() -> LocalCluster | None:
    """The running cluster this library started on this machine (``byzerllm start``'s first, else the
    newest embedded one), or None. Removes the records of clusters that are gone."""
    directory = _records_dir()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return None
    here = socket.gethostname()
    running = []
    for name in names:
        if not name.endswith(".json"):
            continue
        cluster = _read_record(os.path.join(directory, name))
        if cluster is None or cluster.host != here:  # a home shared with other machines
            continue
        if _alive(cluster):
            running.append(cluster)
        else:
            _remove_record(cluster.record)
    running.sort(key=lambda c: (c.kind == STARTED, c.started), reverse=True)
    return running[0] if running else None


def _join_local() -> str | None:
    """The hook of a plain ``init()``: the address of the running local cluster, or None."""
    import ray

    if ray.is_initialized():
        return None
    cluster = find_local_cluster()
    if cluster is None:
        return None
    logger.info("joining the local cluster (%s) at %s", cluster.kind, cluster.ray_address)
    _use_ray_auth(cluster.ray_auth_mode)
    return cluster.ray_address


def _use_ray_auth(mode: str | None) -> None:
    """Send Ray's auth token to a cluster that wants one. Ray itself turns token mode on only for a
    cluster it finds on its own (``address="auto"``), never for an address it is given."""
    import sys

    if mode != "token" or os.environ.get(RAY_AUTH_MODE_ENV) == "token":
        return
    os.environ[RAY_AUTH_MODE_ENV] = "token"
    if "ray._raylet" in sys.modules:
        # Ray read its config at import; refresh it, as Ray does when it enables token mode itself.
        from ray._raylet import Config

        Config.initialize("")


def _record_embedded(ray_address: str) -> None:
    pid = os.getpid()
    record = os.path.join(_records_dir(), f"embedded-{pid}.json")
    try:
        _write_record(LocalCluster(ray_address, pid, _process_start(pid) or 0.0, EMBEDDED, socket.gethostname(),
                                   record, os.environ.get(RAY_AUTH_MODE_ENV)))
        _state["local_record"] = record
    except OSError as exc:  # other drivers will not find it; this one works all the same
        logger.warning("cannot record the local cluster in %s: %s", record, exc)


def _forget_embedded() -> None:
    record = _state.pop("local_record", None)
    if record:
        _remove_record(record)


def _ray_temp_dir() -> str:
    # Ray's own temp dir, one per home. Not /tmp/ray: `ray start` writes its address there
    # (ray_current_cluster), and every plain `ray.init()` on the machine would then join this
    # cluster. Short, because Ray's socket paths below it must stay under 107 characters.
    digest = hashlib.sha256(home_dir().encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"byzerllm-ray-{digest}")


def start_local_cluster(
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    http_port: int | None = None,
    include_dashboard: bool = True,
) -> tuple[LocalCluster, ClusterInfo]:
    """Start a Ray head and Serve on 127.0.0.1 that outlive this process (``byzerllm start``).

    Ray runs as ``ray start --head --block`` in a session of its own, so :func:`stop_local_cluster`
    stops exactly its processes; Serve's controller is a detached actor of that cluster. Other drivers
    on this machine join it with plain ``init()``.

    Args:
        num_cpus, num_gpus: resources of the cluster (default: what the machine has).
        http_port: port of Serve's proxy; None takes 8000, or a free port when 8000 is taken.
        include_dashboard: start Ray's dashboard (detached finetune jobs need it).

    Returns:
        The record of the cluster and this process's connection to it.

    Raises:
        ClusterError: one is already running, or Ray or Serve did not start (the message names the log).
    """
    import subprocess
    import sys

    record = os.path.join(_records_dir(), _STARTED_RECORD)
    running = _read_record(record)
    if running is not None and _alive(running):
        raise ClusterError(
            f"a local cluster is already running at {running.ray_address} (started by `byzerllm start`, "
            f"pid {running.pid}); stop it first with `byzerllm stop`"
        )
    os.makedirs(_records_dir(), exist_ok=True)
    port = 6379 if _port_free("0.0.0.0", 6379) else _free_port("127.0.0.1")
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(port), "--temp-dir", _ray_temp_dir(),
        "--include-dashboard", str(include_dashboard).lower(), "--dashboard-host", "127.0.0.1",
        # Fixed defaults (8265, 10001, 52365) would clash with any other Ray on the machine.
        "--dashboard-port", str(_free_port("127.0.0.1")),
        "--ray-client-server-port", str(_free_port("127.0.0.1")),
        "--dashboard-agent-listen-port", str(_free_port("127.0.0.1")),
        "--disable-usage-stats",
        # As for the embedded Ray: model workers at Ray's default nice 15 lose the CPU to Spark.
        "--system-config", json.dumps({"worker_niceness": 0}),
    ]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    log = os.path.join(_records_dir(), "local.log")
    # Token auth unless the user opted out, as Ray does for a local cluster it starts in ray.init().
    auth_mode = os.environ.get(RAY_AUTH_MODE_ENV) or "token"
    if auth_mode == "token":  # creates ~/.ray/auth_token when there is none (the token goes nowhere else)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    # No drain on stop: it waits up to 30 s for proxies that a local cluster has no one to hand over to.
    instance = uuid.uuid4().hex
    env = dict(os.environ, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", **{RAY_AUTH_MODE_ENV: auth_mode,
                                                                        _INSTANCE_ENV: instance})
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    cluster = LocalCluster(f"127.0.0.1:{port}", proc.pid, _process_start(proc.pid) or 0.0, STARTED,
                           socket.gethostname(), record, auth_mode, log, instance)
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while _port_free("0.0.0.0", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"`ray start` did not start (exit code {proc.poll()}); see {log}")
            time.sleep(0.2)
        _use_ray_auth(auth_mode)
        info = init(ray_address=cluster.ray_address, http_port=http_port)
        cluster = replace(cluster, ray_address=info.ray_address)
        _write_record(cluster)
    except BaseException:
        shutdown()
        _stop_session(cluster, timeout=30)
        raise
    return cluster, info


def stop_local_cluster(timeout: float = 60) -> LocalCluster | None:
    """Stop the cluster :func:`start_local_cluster` started (``byzerllm stop``), and nothing else.

    Every process of its session gets SIGTERM (``ray start --block`` stops its own), and SIGKILL after
    ``timeout`` seconds. Returns its record, or None when none was running.
    """
    record = os.path.join(_records_dir(), _STARTED_RECORD)
    cluster = _read_record(record)
    if cluster is None:
        return None
    if _state["info"] is not None and _state["info"].ray_address == cluster.ray_address:
        shutdown()  # this process is one of its drivers: disconnect first
    _stop_session(cluster, timeout)
    _remove_record(record)
    return cluster


def local_cluster_processes(cluster: LocalCluster) -> list[Any]:
    """The live processes of a started cluster (``psutil.Process``): those of its owner's session that
    carry its instance in their environment, zombies left out."""
    import psutil

    if cluster.kind != STARTED or not cluster.instance:
        return []
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if (os.getsid(proc.pid) == cluster.pid and proc.info["status"] != psutil.STATUS_ZOMBIE
                    and proc.environ().get(_INSTANCE_ENV) == cluster.instance):
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _stop_session(cluster: LocalCluster, timeout: float) -> None:
    import psutil

    def signal_all(procs: list[Any], how: str) -> None:
        for proc in procs:
            try:
                getattr(proc, how)()
            except psutil.Error:
                pass

    # On SIGTERM, `ray start --block` stops the processes it started, in order.
    owner = [p for p in local_cluster_processes(cluster) if p.pid == cluster.pid]
    signal_all(owner, "terminate")
    psutil.wait_procs(owner, timeout=timeout)
    rest = local_cluster_processes(cluster)
    signal_all(rest, "terminate")
    _, left = psutil.wait_procs(rest, timeout=5)
    signal_all(left, "kill")
    psutil.wait_procs(left, timeout=5)
