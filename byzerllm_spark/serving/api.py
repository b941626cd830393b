"""deploy / undeploy / exists / list_models / stat / workers over Ray Serve applications.

One Serve application per model name; its replicas are the model's workers.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from typing import Any, Mapping

from .. import cluster
from ..config import DeployConfig, InferParams
from ..errors import ConfigError, DeploymentError, ModelNotFoundError, ResourceError

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "ByzerLLMWorker"
#: Requests a SaaS worker holds per upstream slot (see ``_run``).
SAAS_QUEUE_DEPTH = 4


def deploy(
    model: str,
    *,
    pretrained_model_type: str = "custom/auto",
    infer_backend: str | None = None,
    model_path: str | None = None,
    model_table: str | None = None,
    num_workers: int = 1,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float = 0,
    worker_concurrency: int = 1,
    infer_params: Mapping[str, Any] | None = None,
    load_balance: str = "lru",
    reconnect: bool = False,
    wait_ready_timeout: float = 300,
    udf_name: str | None = None,
    spark: Any = None,
    sys_conf: Mapping[str, Any] | None = None,
    local_path_prefix: str | None = None,
) -> DeployConfig:
    """Deploy a model as a Ray Serve application named ``model``.

    Args:
        model: the deployment's unique name (seed 002's ``--model``); also its URL prefix.
        pretrained_model_type: ``custom/auto`` (built-in engines), ``custom/<plugin>``, a dotted
            module path of a seed 001 plugin, or ``saas/<vendor>`` (an OpenAI-compatible API; the
            ``saas.*`` keys of ``infer_params`` configure it, see ``backends/saas.py``).
        infer_backend: for ``custom/auto``: ``transformers`` (default when installed) or
            ``llama_cpp``.
        model_path: a Hugging Face model directory, a ``.gguf`` file or a directory holding one.
            None: the embedded SmolLM2-135M-Instruct.
        model_table: a Delta model table to materialise on each worker instead of model_path.
        num_workers: replicas (seed 000's ``maxConcurrency``).
        cpus_per_worker, gpus_per_worker: Ray resources per replica; fractions allowed.
            cpus_per_worker defaults to 1 (0.001 for SaaS types, as in seed 002).
        worker_concurrency: requests one worker takes at once (``max_ongoing_requests``). For
            ``saas/*``: upstream calls one worker makes at once; it queues up to 4x that many.
        infer_params: the seed's string map: ``saas.*``, ``backend.*``, ``generation.*``, plain keys.
        load_balance: ``lru`` (default) or ``round_robin``.
        reconnect: reuse a live deployment of the same name instead of refusing.
        wait_ready_timeout: seconds to wait for every worker to load (seed's
            ``modelWaitServerReadyTimeout``).
        udf_name, spark: register the model's SQL function in that SparkSession.

    Returns:
        The parsed DeployConfig.

    Raises:
        ConfigError: a parameter is malformed (named in the message).
        BackendNotFoundError: unknown model type or backend (lists the available ones).
        ResourceError: no node can ever satisfy the resources asked for.
        DeploymentError: the name is taken, loading failed, or ``wait_ready_timeout`` passed.

    Example:
        >>> bls.deploy("chat", num_workers=2, cpus_per_worker=0.5)  # doctest: +SKIP
    """
    from ..backends import registry
    from ..backends._model_files import check_model_path

    if cpus_per_worker is None:
        cpus_per_worker = 0.001 if pretrained_model_type.startswith("saas/") else 1.0
    if isinstance(num_workers, str) or isinstance(cpus_per_worker, str):
        raise ConfigError("num_workers and cpus_per_worker take numbers, not strings")
    config = DeployConfig(
        model=model,
        pretrained_model_type=pretrained_model_type,
        infer_backend=infer_backend,
        model_path=model_path,
        model_table=model_table,
        num_workers=num_workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        worker_concurrency=worker_concurrency,
        infer_params=InferParams.parse(infer_params),
        load_balance=load_balance,
        udf_name=udf_name,
        sys_conf=dict(sys_conf or {}),
        local_path_prefix=local_path_prefix,
    )
    if not isinstance(wait_ready_timeout, (int, float)) or wait_ready_timeout <= 0:
        raise ConfigError(f"wait_ready_timeout={wait_ready_timeout!r} is not valid: use seconds > 0, e.g. 300")
    registry.check(config)
    info = cluster.ensure_init()

    if exists(model):
        if not reconnect:
            raise DeploymentError(
                f"model {model!r} is already deployed; pass reconnect=True to reuse it, or "
                f"bls.undeploy({model!r}) first"
            )
        logger.info("reconnected to deployed model %r", model)
        _openai_app()
        if spark is not None:
            _register_sql(spark, model, udf_name)
        return _stored_config(model) or config

    if config.model_path is not None and info.embedded:
        # Only checkable here when the workers share this machine; on a cluster the worker reports it.
        if config.pretrained_model_type == "custom/auto":
            check_model_path("model_path", config.model_path)
        elif not os.path.exists(config.model_path):
            raise ConfigError(f"model_path={config.model_path!r} is not valid: the path does not exist")
    if config.model_table is not None:
        from ..model_table import is_model_table

        if info.embedded and not is_model_table(config.model_table):
            raise ModelNotFoundError(
                f"model_table={config.model_table!r} is not a model table; save one with bls.save_model_table(...)"
            )
    _check_resources(config)
    _run(config, wait_ready_timeout)
    _openai_app()
    if spark is not None:
        _register_sql(spark, model, udf_name)
    return config


def _openai_app() -> None:
    """Every deployment is also reachable at ``{endpoint}/v1`` (OpenAI-compatible); start that app once."""
    from ._openai import ensure_openai_app

    try:
        ensure_openai_app()
    except Exception as exc:  # the model itself is up; its Arrow route works without /v1
        logger.warning("the OpenAI-compatible app (/v1) could not start: %s", str(exc).splitlines()[0][:500])


def _register_sql(spark: Any, model: str, udf_name: str | None) -> None:
    from ..spark import register_functions, register_model_function

    register_functions(spark)
    register_model_function(spark, model, udf_name=udf_name or model)


def _check_resources(config: DeployConfig) -> None:
    """Refuse resource asks that no node can ever meet, instead of waiting forever."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    need_cpu, need_gpu = config.cpus_per_worker, config.gpus_per_worker
    fits = [
        n for n in nodes
        if n["Resources"].get("CPU", 0) >= need_cpu and n["Resources"].get("GPU", 0) >= need_gpu
    ]
    have = ", ".join(
        f"{n.get('NodeManagerAddress')}: CPU={n['Resources'].get('CPU', 0):g} GPU={n['Resources'].get('GPU', 0):g}"
        for n in nodes
    )
    if not fits:
        what = f"gpus_per_worker={need_gpu!r}" if need_gpu and not any(
            n["Resources"].get("GPU", 0) >= need_gpu for n in nodes
        ) else f"cpus_per_worker={need_cpu!r}"
        raise ResourceError(
            f"{what} can never be satisfied: no node of this Ray cluster has that much ({have}); "
            "lower it, or join a cluster that has the resources (bls.init(ray_address=...))"
        )
    total_cpu = sum(n["Resources"].get("CPU", 0) for n in fits)
    if need_cpu * config.num_workers > total_cpu + 1e-9:
        raise ResourceError(
            f"num_workers={config.num_workers} x cpus_per_worker={need_cpu:g} needs {need_cpu * config.num_workers:g} "
            f"CPUs but the cluster has {total_cpu:g} ({have}); use fewer workers or a fractional cpus_per_worker"
        )
    if need_gpu:
        total_gpu = sum(n["Resources"].get("GPU", 0) for n in fits)
        if need_gpu * config.num_workers > total_gpu + 1e-9:
            raise ResourceError(
                f"num_workers={config.num_workers} x gpus_per_worker={need_gpu:g} needs "
                f"{need_gpu * config.num_workers:g} GPUs but the cluster has {total_gpu:g}; use fewer workers "
                "or a fractional gpus_per_worker (seed 000: 0.5 shares one GPU between two workers)"
            )


#: (first, longest) wait in seconds before a request that found every worker full looks again.
#: Serve polls for a free replica (it is not told when one frees up); its default of up to 0.5 s
#: left workers idle between LLM batches (measured: SmolLM2 via SQL fell to 0.86 of in-process).
ROUTER_BACKOFF_S = (0.005, 0.05)


def _run(config: DeployConfig, wait_ready_timeout: float) -> None:
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from ._router import ROUND_ROBIN_ROUTER, LRURequestRouter
    from ._stats import StatsActor, stats_actor_name
    from ._worker import ModelWorker

    router = LRURequestRouter if config.load_balance == "lru" else ROUND_ROBIN_ROUTER
    stats = StatsActor.options(
        name=stats_actor_name(config.model), namespace=cluster.NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(config.model, pickle.dumps(config), config.load_balance, config.worker_concurrency)
    import ray

    ray.get(stats.snapshot.remote())  # created and reachable before any replica reports
    actor_options: dict[str, Any] = {"num_cpus": config.cpus_per_worker, "num_gpus": config.gpus_per_worker}
    # A SaaS worker only waits on the network. It accepts a few requests more than it sends upstream
    # at once (its backend keeps worker_concurrency upstream calls in flight), so the next batch is
    # already there when one ends, instead of waiting out the router's retry backoff (25-500 ms).
    max_ongoing = config.worker_concurrency * (SAAS_QUEUE_DEPTH if config.is_saas else 1)
    app = (
        serve.deployment(ModelWorker)
        .options(
            name=DEPLOYMENT_NAME,
            num_replicas=config.num_workers,
            max_ongoing_requests=max_ongoing,
            ray_actor_options=actor_options,
            request_router_config=RequestRouterConfig(
                request_router_class=router, initial_backoff_s=ROUTER_BACKOFF_S[0], max_backoff_s=ROUTER_BACKOFF_S[1]
            ),
            health_check_period_s=5,
            health_check_timeout_s=60,
            graceful_shutdown_timeout_s=5,
        )
        .bind(config)
    )
    started = time.monotonic()
    # Per-request access logs cost more than the echo model's work; errors are still logged.
    logging_config = {"enable_access_log": False, "log_level": os.environ.get("BYZERLLM_LOG_LEVEL", "WARNING")}
    serve._run(
        app, _blocking=False, name=config.model, route_prefix=f"/{config.model}", logging_config=logging_config
    )
    _wait_running(config, started, wait_ready_timeout)


def _wait_running(config: DeployConfig, started: float, timeout: float) -> None:
    from ray import serve

    last_message = ""
    while True:
        status = serve.status().applications.get(config.model)
        if status is not None:
            state = str(status.status).split(".")[-1]
            if state == "RUNNING":
                logger.info("model %r ready in %.1fs", config.model, time.monotonic() - started)
                return
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                message = _failure_message(status)
                _delete(config.model)
                raise DeploymentError(f"model {config.model!r} failed to start: {message}")
            last_message = _failure_message(status)
        if time.monotonic() - started > timeout:
            _delete(config.model)
            raise DeploymentError(
                f"model {config.model!r} was not ready after wait_ready_timeout={timeout:g}s "
                f"({last_message or 'workers still loading or waiting for resources'}); it has been removed. "
                "Raise wait_ready_timeout, or free resources held by other deployments."
            )
        time.sleep(0.25)


def _failure_message(status) -> str:
    parts = [status.message] if getattr(status, "message", "") else []
    for dep in getattr(status, "deployments", {}).values():
        if getattr(dep, "message", ""):
            parts.append(dep.message)
    text = " | ".join(parts)
    # Keep the end of a replica traceback: the exception line says what went wrong.
    lines = [line for line in text.splitlines() if line.strip()]
    tail = [line for line in lines if "Error" in line or "error" in line][-3:]
    return " ".join(tail or lines[-3:])[:2000]


def _delete(model: str) -> None:
    from ray import serve

    try:
        serve.delete(model, _blocking=True)
    except Exception:
        logger.debug("serve.delete(%r) failed", model, exc_info=True)
    from ._stats import get_stats_actor

    actor = get_stats_actor(model)
    if actor is not None:
        import ray

        ray.kill(actor, no_restart=True)


def _stored_config(model: str) -> DeployConfig | None:
    import ray

    from ._stats import get_stats_actor

    actor = get_stats_actor(model)
    if actor is None:
        return None
    return pickle.loads(ray.get(actor.config.remote()))


def undeploy(model: str) -> None:
    """Remove a deployed model and its workers (seed 000: ``!byzerllm model remove chat;``).

    Raises:
        ModelNotFoundError: no such model (lists the deployed ones).
    """
    cluster.ensure_init()
    if not exists(model):
        raise ModelNotFoundError(_not_deployed(model))
    _delete(model)


def exists(model: str) -> bool:
    """True when a model of this name is deployed by this library."""
    return model in list_models()


def list_models() -> list[str]:
    """Names of the deployed models, sorted."""
    from ray import serve

    cluster.ensure_init()
    apps = serve.status().applications
    return sorted(name for name, app in apps.items() if DEPLOYMENT_NAME in getattr(app, "deployments", {}))


def _not_deployed(model: str) -> str:
    deployed = list_models()
    return f"model {model!r} is not deployed; deployed models: {deployed if deployed else 'none'} (bls.deploy(...) first)"


def _live_replicas(model: str) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    import ray

    from ._stats import get_stats_actor, replica_alive

    cluster.ensure_init()
    actor = get_stats_actor(model)
    if actor is None or not exists(model):
        raise ModelNotFoundError(_not_deployed(model))
    snap = ray.get(actor.snapshot.remote())
    live = []
    for replica, data in snap["replicas"].items():
        if replica_alive(replica):
            live.append((replica, data))
        else:
            actor.forget.remote(replica)
    live.sort(key=lambda item: item[1]["started"])
    return snap, live


def stat(model: str) -> dict[str, Any]:
    """Live worker counters of a model: seed 002's fields first, in its order, then token usage.

    Returns:
        ``total_workers, busy_workers, idle_workers, load_balance_strategy, total_requests[],
        state[] (free slots per worker), worker_max_concurrency, workers_last_work_time[]``, then
        ``total_prompt_tokens`` and ``total_completion_tokens`` (summed over the live workers, as
        the backends report them: transformers, llama.cpp and SaaS vendors do; plugins may).
        ``total_requests`` counts requests (rows) answered by each worker.

    Raises:
        ModelNotFoundError: the model is not deployed.
    """
    snap, live = _live_replicas(model)
    now = snap["now"]
    max_c = snap["max_concurrency"]
    busy = sum(1 for _, d in live if d["in_flight"] > 0)
    return {
        "total_workers": len(live),
        "busy_workers": busy,
        "idle_workers": len(live) - busy,
        "load_balance_strategy": snap["strategy"],
        "total_requests": [d["total_requests"] for _, d in live],
        "state": [max(0, max_c - d["in_flight"]) for _, d in live],
        "worker_max_concurrency": max_c,
        "workers_last_work_time": [f"{max(0.0, now - d['last_work_time'])}s" for _, d in live],
        "total_prompt_tokens": sum(d.get("prompt_tokens", 0) for _, d in live),
        "total_completion_tokens": sum(d.get("completion_tokens", 0) for _, d in live),
    }


def workers(model: str) -> list[dict[str, Any]]:
    """Per-worker details beyond ``stat``: replica id, pid, node, backend, load time."""
    _, live = _live_replicas(model)
    return [
        {
            "replica": replica,
            "pid": d["pid"],
            "node_ip": d["node_ip"],
            "backend": d["backend"],
            "load_seconds": round(d["load_seconds"], 3),
            "in_flight": d["in_flight"],
            "total_requests": d["total_requests"],
            "prompt_tokens": d.get("prompt_tokens", 0),
            "completion_tokens": d.get("completion_tokens", 0),
        }
        for replica, d in live
    ]


def deploy_config(model: str) -> DeployConfig:
    """The configuration a deployed model was started with (``saas.api_key`` stays redacted in its repr)."""
    cluster.ensure_init()
    config = _stored_config(model)
    if config is None or not exists(model):
        raise ModelNotFoundError(_not_deployed(model))
    return config
