"""Where the models run: an embedded local Ray, an existing cluster, or Ray on Spark.

``init()`` with no arguments starts Ray in this process's machine and Ray Serve's HTTP proxy on
127.0.0.1, so a notebook or a spark-submit driver needs nothing running beforehand. Binding any
other address needs ``auth_token``: every route then requires ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from . import _kv, auth, transport
from .errors import ClusterError, ConfigError, bad_value
from .settings import (
    AUTH_TOKEN_ENV,
    DEFAULT_HTTP_PORT,
    KV_ENDPOINT,
    LOOPBACK_HOSTS,
    MIN_TOKEN_LENGTH,
    NAMESPACE,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    """What ``init()`` connected to."""

    ray_address: str
    endpoint: str
    embedded: bool
    dashboard_url: str | None = None


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


def init(
    ray_address: str | None = None,
    *,
    http_host: str = "127.0.0.1",
    http_port: int | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    spark: Any = None,
    ray_on_spark_workers: int | None = None,
    include_dashboard: bool | None = None,
    runtime_env: dict | None = None,
    auth_token: str | None = None,
) -> ClusterInfo:
    """Connect to (or start) Ray and Ray Serve. Safe to call twice.

    Args:
        ray_address: None starts an embedded local Ray; ``"auto"`` or ``"ray://host:10001"`` or
            ``"host:6379"`` joins an existing cluster (Byzer-LLM's ``rayAddress``).
        http_host: address Serve's HTTP proxy binds. Keep 127.0.0.1 unless executors on other
            machines must reach it; any other address requires ``auth_token``.
        http_port: port of the proxy; None takes 8000, or a free port when 8000 is taken.
        num_cpus, num_gpus: resources of the embedded Ray (default: what the machine has).
        spark: with ``ray_on_spark_workers``, start Ray on the Spark cluster
            (``ray.util.spark.setup_ray_cluster``) and join it.
        include_dashboard: start Ray's dashboard (needed for detached jobs); default: Ray decides.
        runtime_env: Ray runtime environment for all workers.
        auth_token: a secret of at least 16 characters (``secrets.token_urlsafe(32)``); default
            ``$BYZERLLM_AUTH_TOKEN``. When set, every HTTP route (Arrow, stream, ``/v1``) answers 401
            unless the request sends ``Authorization: Bearer <token>``; ``bls.chat`` and the Spark
            functions send it (executors read ``$BYZERLLM_AUTH_TOKEN``: on a Spark cluster set
            ``spark.executorEnv.BYZERLLM_AUTH_TOKEN``). The cluster stores only its sha256.

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

    token = _check_auth(http_host, auth_token)
    if _state["info"] is not None and ray.is_initialized():
        if token:
            transport.set_auth_token(token)
        return _state["info"]

    if spark is not None and ray_on_spark_workers:
        ray_address = _start_ray_on_spark(spark, ray_on_spark_workers)

    embedded = ray_address is None
    init_kwargs: dict[str, Any] = {"namespace": NAMESPACE, "ignore_reinit_error": True, "log_to_driver": True}
    if runtime_env:
        init_kwargs["runtime_env"] = runtime_env
    if embedded:
        if num_cpus is not None:
            init_kwargs["num_cpus"] = num_cpus
        if num_gpus is not None:
            init_kwargs["num_gpus"] = num_gpus
        if include_dashboard is not None:
            init_kwargs["include_dashboard"] = include_dashboard
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

    endpoint = _start_serve(http_host, http_port, token)
    transport.set_auth_token(token)
    if token:
        # Spark's Python workers (local mode) inherit the driver's environment: they send it too.
        os.environ.setdefault(AUTH_TOKEN_ENV, token)
    dashboard = getattr(context, "dashboard_url", None) if context is not None else None
    info = ClusterInfo(
        ray_address=ray.get_runtime_context().gcs_address,
        endpoint=endpoint,
        embedded=embedded,
        dashboard_url=f"http://{dashboard}" if dashboard else None,
    )
    _state["info"] = info
    logger.info("byzerllm_spark: Ray at %s, Serve endpoint %s", info.ray_address, info.endpoint)
    return info


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


def _start_serve(http_host: str, http_port: int | None, token: str | None = None) -> str:
    from ray import serve

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
        return existing.decode()
    auth.publish(token)  # before any replica starts: each reads it once
    if http_port is None:
        http_port = DEFAULT_HTTP_PORT if _port_free(http_host, DEFAULT_HTTP_PORT) else _free_port(http_host)
    elif http_port == 0:
        http_port = _free_port(http_host)
    for attempt in range(3):
        try:
            serve.start(proxy_location="HeadOnly", http_options={"host": http_host, "port": http_port})
            break
        except Exception as exc:
            # On a loaded machine the proxy can miss its first readiness check; Serve then
            # kills it. Starting again usually succeeds.
            if attempt == 2:
                raise ClusterError(f"cannot start Ray Serve on {http_host}:{http_port}: {exc}") from exc
            logger.warning("Serve did not start (%s); retrying", str(exc).splitlines()[0])
            time.sleep(2)
    endpoint = f"http://{'127.0.0.1' if http_host in ('0.0.0.0', 'localhost') else http_host}:{http_port}"
    _kv.put(KV_ENDPOINT, endpoint.encode())
    return endpoint


def _serve_running() -> bool:
    from ray import serve

    try:
        serve.status()
        return True
    except Exception:
        return False


def _start_ray_on_spark(spark: Any, workers: int) -> str:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.util.spark import setup_ray_cluster

    address, _ = setup_ray_cluster(max_worker_nodes=workers, num_cpus_worker_node=None)
    _state["ray_on_spark"] = True
    return address


def info() -> ClusterInfo:
    """The current connection. Raises ClusterError before ``init()``."""
    if _state["info"] is None:
        raise ClusterError("byzerllm_spark is not connected: call bls.init() first")
    return _state["info"]


def ensure_init() -> ClusterInfo:
    """``init()`` with defaults unless already connected (the functions call this for you)."""
    import ray

    if _state["info"] is None or not ray.is_initialized():
        _state["info"] = None
        return init()
    return _state["info"]


def endpoint() -> str:
    """Base URL of the HTTP endpoint, e.g. ``http://127.0.0.1:8000``.

    Models answer at ``{endpoint}/{model}/arrow`` (see the README's Arrow contract).
    """
    return ensure_init().endpoint


def shutdown() -> None:
    """Stop Serve and Ray if this process started them; otherwise just disconnect."""
    import ray

    if not ray.is_initialized():
        _state["info"] = None
        return
    if _state["started_ray"]:
        from ray import serve

        try:
            serve.shutdown()
        except Exception:  # pragma: no cover - best effort on the way out
            logger.debug("serve.shutdown failed", exc_info=True)
    if _state.get("ray_on_spark"):
        from ray.util.spark import shutdown_ray_cluster

        shutdown_ray_cluster()
    ray.shutdown()
    transport.set_auth_token(None)
    _state.update(info=None, started_ray=False, ray_on_spark=None)
