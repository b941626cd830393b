"""deploy / undeploy / exists / list_models / stat / workers: models as Ray Serve applications.

The driver's side: parse and check the request, fail fast when the cluster cannot hold it, start the
application (:mod:`..serving.app`) and wait for its workers with progress, register the SQL function.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

from .. import cluster
from ..config import (DEFAULT_MAX_LORAS, CacheSpec, DeployConfig, InferParams, byzer_deploy_args, check_adapter_name,
                      parse_lora_adapters)
from ..errors import ConfigError, DeploymentError, ModelNotFoundError, ResourceError, not_deployed
from ..serving import app as serve_app

logger = logging.getLogger(__name__)

#: deploy() arguments that DeployConfig takes as they are.
_CONFIG_ARGS = (
    "pretrained_model_type", "infer_backend", "model_path", "model_table", "num_workers", "cpus_per_worker",
    "gpus_per_worker", "worker_concurrency", "load_balance", "udf_name", "local_path_prefix", "min_workers",
    "max_workers", "max_loras",
)


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
    worker_concurrency: int | None = None,
    infer_params: Mapping[str, Any] | None = None,
    load_balance: str = "lru",
    reconnect: bool = False,
    wait_ready_timeout: float = 300,
    udf_name: str | None = None,
    spark: Any = None,
    sys_conf: Mapping[str, Any] | None = None,
    local_path_prefix: str | None = None,
    resources: Mapping[str, float] | None = None,
    cache: Any = None,
    min_workers: int | None = None,
    max_workers: int | None = None,
    autoscaling_config: Mapping[str, Any] | None = None,
    lora_adapters: Mapping[str, str] | str | None = None,
    max_loras: int = DEFAULT_MAX_LORAS,
    **byzer_names: Any,
) -> DeployConfig:
    """Deploy a model as a Ray Serve application named ``model``.

    Args:
        model: the deployment's unique name (Byzer-LLM's ``--model`` / ``udfName``); also its URL prefix.
        pretrained_model_type: ``custom/auto`` (built-in engines), ``custom/<plugin>``, a dotted
            module path of a Byzer-LLM model plugin, or ``saas/<vendor>`` (an OpenAI-compatible API; the
            ``saas.*`` keys of ``infer_params`` configure it, see ``backends/saas.py``).
        infer_backend: for ``custom/auto``: ``transformers`` (default when installed) or
            ``llama_cpp``.
        model_path: a Hugging Face model directory, a ``.gguf`` file or a directory holding one.
            None: the embedded SmolLM2-135M-Instruct.
        model_table: a Delta model table to materialise on each worker instead of model_path.
        num_workers: replicas (Byzer-LLM's ``maxConcurrency``).
        cpus_per_worker, gpus_per_worker: Ray resources per replica; fractions allowed.
            cpus_per_worker defaults to 1 (0.001 for SaaS types, as in Byzer-LLM).
        worker_concurrency: requests one worker takes at once (``max_ongoing_requests``); default 1,
            64 for ``infer_backend='vllm'`` (vLLM batches them). For ``saas/*``: upstream calls one worker
            makes at once; it queues up to 4x that many.
        infer_params: Byzer-LLM's string map: ``saas.*``, ``backend.*``, ``generation.*``, plain keys.
        load_balance: ``lru`` (default) or ``round_robin``.
        reconnect: reuse a live deployment of the same name instead of refusing.
        wait_ready_timeout: seconds to wait for every worker to load (Byzer-LLM's
            ``modelWaitServerReadyTimeout``).
        udf_name, spark: register the model's SQL function in that SparkSession.
        resources: custom Ray resources each worker needs, ``{"master": 0.01}`` (Byzer-LLM's
            ``!byzerllm setup "resource.master=0.01"``): pins workers to nodes started with that
            resource (``ray start --resources '{"master": 1}'``). Default None: none.
        min_workers, max_workers: autoscaling instead of a fixed ``num_workers``: Ray Serve keeps
            between ``min_workers`` (default 1) and ``max_workers`` workers, adding one when every
            worker's ``worker_concurrency`` slots are taken and requests wait (after 5 s), removing one
            after 60 s of less work. ``min_workers=0`` scales to zero when idle: ``deploy`` then starts
            no worker and the first request waits while one loads. Default None: no autoscaling.
        autoscaling_config: Ray Serve ``AutoscalingConfig`` keys over these defaults, e.g.
            ``{"downscale_delay_s": 300, "target_ongoing_requests": 2}``; only with ``max_workers``.
        cache: the response cache (see ``serving/cache.py``); default None: off. ``True`` keeps the answers
            of deterministic requests (temperature 0, a ``generation.seed``) in a diskcache folder on each
            worker's node; ``"always"`` keeps every answer; a store URI picks the store:
            ``"redis://host:6379/0"`` (a server every node reaches: use it on a cluster) or
            ``"diskcache:///abs/dir"``; ``{"store": uri, "mode": "always"}`` both. A re-run query, a
            Spark task retry, ``bls.chat`` and ``/v1`` then send upstream only what was not answered.
        lora_adapters: LoRA adapters served over this one base model, ``{name: adapter directory}`` (or
            ``"name=/path,name2=/path2"``): PEFT adapter directories (``bls.job_output(job)`` of
            ``bls.sft(..., merge=False)``) or model tables of them. A row picks one with its ``adapter``
            key (``llm_param(map('instruction', q, 'adapter', 'facts'))``), an OpenAI client with
            ``model="<model>:<adapter>"``; no ``adapter``: the base model. Each worker loads each adapter
            once; an adapter trained on another base model fails the deploy, naming the layer that does
            not fit. ``infer_backend='transformers'`` (and ``vllm``) only. Default None: none; add more
            later with :func:`add_adapter`.
        max_loras: the most adapters the deployment holds, those of ``lora_adapters`` and
            :func:`add_adapter` together (default 8); more is a ConfigError.
        **byzer_names: Byzer-LLM's names for the arguments above (``pretrainedModelType``,
            ``inferBackend``, ``modelPath`` / ``localModelDir``, ``modelTable``, ``udfName``,
            ``localPathPrefix``, ``modelWaitServerReadyTimeout``, ``reconnect``, ``maxConcurrency``,
            ``num_gpus``), here or inside ``infer_params`` as Byzer-LLM's SQL passes them.

    Returns:
        The parsed DeployConfig.

    Raises:
        ConfigError: a parameter is malformed (named in the message; ``cache=`` with the accepted forms).
        BackendNotFoundError: unknown model type or backend (lists the available ones).
        ResourceError: no node can ever satisfy the resources asked for.
        DeploymentError: the name is taken, loading failed, or ``wait_ready_timeout`` passed.

    Example:
        >>> bls.deploy("chat", num_workers=2, cpus_per_worker=0.5)  # doctest: +SKIP
        >>> bls.deploy("busy", min_workers=1, max_workers=4, worker_concurrency=4)  # doctest: +SKIP
        >>> bls.deploy("base", lora_adapters={"facts": "/jobs/sft-facts-1/adapter"})  # doctest: +SKIP
    """
    from ..backends import registry
    from ..backends._model_files import check_model_path

    defaults = deploy.__kwdefaults__
    args = {name: value for name, value in locals().items() if name in defaults}
    args.update(byzer_deploy_args(args, defaults, byzer_names, infer_params))
    reconnect, wait_ready_timeout, udf_name = args["reconnect"], args["wait_ready_timeout"], args["udf_name"]
    if args["cpus_per_worker"] is None:
        args["cpus_per_worker"] = 0.001 if str(args["pretrained_model_type"]).startswith("saas/") else 1.0
    if args["worker_concurrency"] is None:
        args["worker_concurrency"] = registry.default_worker_concurrency(args["pretrained_model_type"],
                                                                         args["infer_backend"])
    if isinstance(args["num_workers"], str) or isinstance(args["cpus_per_worker"], str):
        raise ConfigError("num_workers and cpus_per_worker take numbers, not strings")
    config = DeployConfig(
        model=model,
        infer_params=InferParams.parse(infer_params),
        sys_conf=dict(sys_conf or {}),
        resources=dict(resources or {}),
        cache=CacheSpec.parse(args["cache"], "cache"),
        autoscaling_config=_autoscaling_config(autoscaling_config),
        lora_adapters=parse_lora_adapters(lora_adapters),
        **{name: args[name] for name in _CONFIG_ARGS},
    )
    if not isinstance(wait_ready_timeout, (int, float)) or wait_ready_timeout <= 0:
        raise ConfigError(f"wait_ready_timeout={wait_ready_timeout!r} is not valid: use seconds > 0, e.g. 300")
    engine = registry.check(config)
    if config.lora_adapters:
        _check_lora_engine(config, engine)
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
        return serve_app.stored_config(model) or config

    if config.model_path is not None and info.embedded:
        # Only checkable here when the workers share this machine; on a cluster the worker reports it.
        if config.pretrained_model_type == "custom/auto":
            check_model_path("model_path", config.model_path)
        elif not os.path.exists(config.model_path):
            raise ConfigError(f"model_path={config.model_path!r} is not valid: the path does not exist")
    if config.lora_adapters and info.embedded:
        for name, path in config.lora_adapters.items():
            _check_adapter_path(f"lora_adapters[{name!r}]", path)
    if config.model_table is not None:
        from ..model_table import is_model_table

        if info.embedded and not is_model_table(config.model_table):
            raise ModelNotFoundError(
                f"model_table={config.model_table!r} is not a model table; save one with bls.save_model_table(...)"
            )
    _check_resources(config)
    _check_free(config)
    _run(config, wait_ready_timeout)
    _openai_app()
    if spark is not None:
        _register_sql(spark, model, udf_name)
    return config


def _check_lora_engine(config: DeployConfig, engine: str) -> None:
    """Refuse ``lora_adapters`` on the driver for an engine that serves none (its workers would fail to start)."""
    from ..backends import registry

    serves = config.pretrained_model_type == "custom/auto" and getattr(
        registry._load(registry._INFER_BACKENDS[engine]), "supports_lora", False)
    if not serves:
        raise ConfigError(f"lora_adapters: {engine} serves no LoRA adapters; deploy the base model with "
                          "infer_backend='transformers' or 'vllm', or merge the adapter (bls.sft(..., merge=True)) "
                          "and deploy the merged model")


def _check_adapter_path(param: str, path: str) -> None:
    """On one machine, refuse an adapter path that is neither a PEFT adapter directory nor a model table."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return
    from ..model_table import is_model_table

    if not is_model_table(path):
        raise ConfigError(f"{param}={path!r} is not a PEFT adapter directory (no adapter_config.json) nor a model "
                          "table; pass the directory bls.job_output(job) gives for bls.sft(..., merge=False)")


def add_adapter(model: str, name: str, path: str) -> list[str]:
    """Add a LoRA adapter to a deployed model, without redeploying it: rows naming ``name`` are answered with it.

    One worker loads it now (an adapter that does not fit the base model fails here); the others load it
    when a row first names it, and workers started later (restarts, autoscaling) too.

    Args:
        model: the deployment's name.
        name: the adapter's name, 1-64 letters, digits, ``_ . -`` (no ``:``); rows pass it as ``adapter``.
        path: a PEFT adapter directory (``bls.job_output(job)`` of ``bls.sft(..., merge=False)``) on the
            workers' nodes, or a model table of one.

    Returns:
        The names of the deployment's adapters, sorted.

    Raises:
        ModelNotFoundError: the model is not deployed.
        ConfigError: a bad name or path, a name already taken by another path, more than ``max_loras``
            adapters, a backend without LoRA, or an adapter that does not fit the base model.

    Example:
        >>> bls.add_adapter("base", "more", "/jobs/sft-more-1/adapter")  # doctest: +SKIP
        ['facts', 'more', 'tone']
    """
    from ray import serve

    from ..serving.stats import get_stats_actor
    from ..settings import DEPLOYMENT_NAME

    check_adapter_name(name, "name")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"path={path!r} is not valid: pass the adapter's directory as a string")
    info = cluster.ensure_init()
    config = serve_app.stored_config(model)
    if config is None or not exists(model):
        raise not_deployed(model, list_models())
    if info.embedded:
        _check_adapter_path("path", path)
    registered = serve_app.lora_adapters(model)
    if registered.get(name, path) != path:
        raise ConfigError(f"name={name!r} is already an adapter of model {model!r} ({registered[name]!r}); "
                          "pick another name")
    if name not in registered and len(registered) >= config.max_loras:
        raise ConfigError(f"max_loras={config.max_loras}: model {model!r} already holds {len(registered)} adapters "
                          f"({', '.join(sorted(registered))}); deploy it again with a higher max_loras")
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=model)
    answer = handle.add_adapter.remote(name, path).result(timeout_s=600)
    if answer.get("error"):
        raise ConfigError(answer["error"])
    import ray

    return sorted(ray.get(get_stats_actor(model).register_adapter.remote(name, path)))


def _autoscaling_config(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """``deploy(autoscaling_config=)`` checked against Ray Serve's own ``AutoscalingConfig``."""
    if not given:
        return {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"autoscaling_config={given!r} is not valid: pass a dict of Ray Serve AutoscalingConfig "
                          "keys, e.g. {'downscale_delay_s': 300}")
    from ray.serve.config import AutoscalingConfig

    known = set(AutoscalingConfig.model_fields)
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"autoscaling_config key {unknown[0]!r} is not a Ray Serve AutoscalingConfig key; "
                          f"valid keys: {', '.join(sorted(known))}")
    try:
        AutoscalingConfig(**{"min_replicas": 0, "max_replicas": 1, **given})
    except Exception as exc:  # pydantic's ValidationError: name the keys and what they need
        raise ConfigError(f"autoscaling_config={dict(given)!r} is not valid: {str(exc).strip()[:600]}") from None
    return dict(given)


def _openai_app() -> None:
    """Every deployment is also reachable at ``{endpoint}/v1`` (OpenAI-compatible); start that app once."""
    from ..serving.openai import ensure_openai_app

    try:
        ensure_openai_app()
    except Exception as exc:  # the model itself is up; its Arrow route works without /v1
        logger.warning("the OpenAI-compatible app (/v1) could not start: %s", str(exc).splitlines()[0][:500])


def _register_sql(spark: Any, model: str, udf_name: str | None) -> None:
    from ..sql.functions import register_model_function

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
    for name, amount in config.resources.items():
        if not any(n["Resources"].get(name, 0) >= amount for n in nodes):
            raise ResourceError(
                f"resources[{name!r}]={amount:g} can never be satisfied: no node of this Ray cluster has the "
                f"resource {name!r} (start a node with `ray start --resources '{{\"{name}\": 1}}'`, or "
                f"bls.init(resources={{{name!r}: 1}}) for the local one)"
            )
    fits = [n for n in fits if all(n["Resources"].get(k, 0) >= v for k, v in config.resources.items())]
    if not fits:
        what = f"gpus_per_worker={need_gpu!r}" if need_gpu and not any(
            n["Resources"].get("GPU", 0) >= need_gpu for n in nodes
        ) else f"cpus_per_worker={need_cpu!r}"
        raise ResourceError(
            f"{what} can never be satisfied: no node of this Ray cluster has that much ({have}); "
            "lower it, or join a cluster that has the resources (bls.init(ray_address=...))"
        )
    total_cpu = sum(n["Resources"].get("CPU", 0) for n in fits)
    count, workers_arg = _started_workers(config)
    if need_cpu * count > total_cpu + 1e-9:
        raise ResourceError(
            f"{workers_arg} x cpus_per_worker={need_cpu:g} needs {need_cpu * count:g} "
            f"CPUs but the cluster has {total_cpu:g} ({have}); use fewer workers or a fractional cpus_per_worker"
        )
    if need_gpu:
        total_gpu = sum(n["Resources"].get("GPU", 0) for n in fits)
        if need_gpu * count > total_gpu + 1e-9:
            raise ResourceError(
                f"{workers_arg} x gpus_per_worker={need_gpu:g} needs "
                f"{need_gpu * count:g} GPUs but the cluster has {total_gpu:g}; use fewer workers "
                "or a fractional gpus_per_worker (0.5 shares one GPU between two workers)"
            )


def _started_workers(config: DeployConfig) -> tuple[int, str]:
    """How many workers ``deploy`` starts, and the argument that says so (for messages)."""
    if config.autoscaling:
        return config.initial_workers, f"min_workers={config.initial_workers}"
    return config.num_workers, f"num_workers={config.num_workers}"


def _check_free(config: DeployConfig) -> None:
    """Refuse at once when the cluster has the resources but others hold them now, naming the holders,
    instead of waiting out ``wait_ready_timeout`` in silence."""
    import ray

    free = ray.available_resources()
    count, workers_arg = _started_workers(config)
    for resource, per_worker, param in (("CPU", config.cpus_per_worker, "cpus_per_worker"),
                                        ("GPU", config.gpus_per_worker, "gpus_per_worker")):
        need = per_worker * count
        if not need or need <= free.get(resource, 0.0) + 1e-9:
            continue
        holders = []
        for name in serve_app.deployed_models():
            held = serve_app.stored_config(name)
            if held is not None:
                per = held.cpus_per_worker if resource == "CPU" else held.gpus_per_worker
                if per:
                    held_count = f"{held.initial_workers}-{held.max_workers}" if held.autoscaling else held.num_workers
                    holders.append(f"{name!r} ({held_count} x {per:g} {resource})")
        raise ResourceError(
            f"{workers_arg} x {param}={per_worker:g} needs {need:g} {resource} but only "
            f"{free.get(resource, 0.0):g} are free now; held by deployed models: {', '.join(holders) or 'none'}"
            f" (and other Ray tasks or finetune jobs). Undeploy one (bls.undeploy(name)), lower {param} "
            "(fractions such as 0.5 are allowed), or use fewer workers"
        )


def _run(config: DeployConfig, wait_ready_timeout: float) -> None:
    started = time.monotonic()
    start = serve_app.start(config)
    progress = _progress(config)
    try:
        while not start.done.wait(0.25):
            state, replicas, message = serve_app.replica_states(config.model)
            progress.update(replicas.get("RUNNING", 0))
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                serve_app.delete(config.model)
                raise DeploymentError(f"model {config.model!r} failed to start: {message}")
            if time.monotonic() - started > wait_ready_timeout:
                serve_app.delete(config.model)
                raise DeploymentError(
                    f"model {config.model!r} was not ready after wait_ready_timeout={wait_ready_timeout:g}s "
                    f"({message or 'workers still loading or waiting for resources'}); it has been removed. "
                    "Raise wait_ready_timeout, or free resources held by other deployments."
                )
        if start.failed is not None:
            state, _, message = serve_app.replica_states(config.model)
            serve_app.delete(config.model)
            reason = message or str(start.failed).splitlines()[-1][:2000]
            raise DeploymentError(f"model {config.model!r} failed to start: {reason}")
        progress.update(config.initial_workers)
    finally:
        progress.close()
    logger.info("model %r ready in %.1fs", config.model, time.monotonic() - started)


class _progress:
    """``workers ready k/n`` while a deployment starts (a tqdm bar; silent in logs and pipes, a widget in notebooks)."""

    def __init__(self, config: DeployConfig) -> None:
        from tqdm.auto import tqdm

        from ..settings import progress_disable

        self._bar = tqdm(total=config.initial_workers, desc=f"deploy {config.model}: workers ready", unit="worker",
                         leave=False, disable=progress_disable(), delay=2.0)

    def update(self, ready: int) -> None:
        if ready > self._bar.n:
            self._bar.update(ready - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def undeploy(model: str) -> None:
    """Remove a deployed model and its workers (Byzer-LLM: ``!byzerllm model remove chat;``).

    Raises:
        ModelNotFoundError: no such model (lists the deployed ones).
    """
    cluster.ensure_init()
    if not exists(model):
        raise not_deployed(model, list_models())
    serve_app.delete(model)


def exists(model: str) -> bool:
    """True when a model of this name is deployed by this library."""
    return model in list_models()


def list_models() -> list[str]:
    """Names of the deployed models, sorted."""
    cluster.ensure_init()
    return serve_app.deployed_models()


def _live_replicas(model: str) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    import ray

    from ..serving.stats import get_stats_actor, replica_alive

    cluster.ensure_init()
    actor = get_stats_actor(model)
    if actor is None or not exists(model):
        raise not_deployed(model, list_models())
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
    """Live worker counters of a model: Byzer-LLM's ``stat`` fields first, in its order, then token usage.

    Returns:
        ``total_workers, busy_workers, idle_workers, load_balance_strategy, total_requests[],
        state[] (free slots per worker), worker_max_concurrency, workers_last_work_time[]``, then
        ``total_prompt_tokens`` and ``total_completion_tokens`` (summed over the live workers, as
        the backends report them: transformers, llama.cpp and SaaS vendors do; plugins may), then,
        where a response cache is in use (``cache=``), ``cache_hits`` (rows answered from it) and
        ``cache_misses`` (rows the engine answered and the cache kept). An autoscaled model
        (``max_workers``) adds ``min_workers``, ``max_workers`` and ``target_workers`` (the count Serve
        is scaling to; ``total_workers`` counts the workers up now). A model with LoRA adapters adds
        ``lora_adapters``, ``{name: directory}`` (deploy's and :func:`add_adapter`'s).
        ``total_requests`` counts requests (rows) answered by each worker.

    Raises:
        ModelNotFoundError: the model is not deployed.
    """
    snap, live = _live_replicas(model)
    now = snap["now"]
    max_c = snap["max_concurrency"]
    busy = sum(1 for _, d in live if d["in_flight"] > 0)
    cached = [(r, d) for r, d in live if "cache_hits" in d]
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
        **({"cache_hits": sum(d["cache_hits"] for _, d in cached), "cache_misses": sum(d["cache_misses"] for _, d in cached)}
           if cached else {}),
        **_autoscaling_stat(model),
        **({"lora_adapters": adapters} if (adapters := serve_app.lora_adapters(model)) else {}),
    }


def _autoscaling_stat(model: str) -> dict[str, Any]:
    """``min_workers``, ``max_workers`` and ``target_workers`` (Serve's current target) of an autoscaled model."""
    config = serve_app.stored_config(model)
    if config is None or not config.autoscaling:
        return {}
    return {"min_workers": config.initial_workers, "max_workers": config.max_workers,
            "target_workers": serve_app.target_workers(model)}


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
    config = serve_app.stored_config(model)
    if config is None or not exists(model):
        raise not_deployed(model, list_models())
    return config
