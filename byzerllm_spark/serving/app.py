"""A deployed model as a Ray Serve application: built, started, inspected and removed, with Serve's
public API only.

One application per model, named after it, route prefix ``/{model}``; its deployment
``ByzerLLMWorker`` has ``num_workers`` replicas of :class:`.replica.ModelWorker` (or Serve's autoscaling
between ``min_workers`` and ``max_workers``), each with
``max_ongoing_requests = worker_concurrency`` and the LRU (or round-robin) request router. A small
detached stats actor per model keeps the replicas' counters for ``stat()``.
"""

from __future__ import annotations

import logging
import pickle
import threading
from dataclasses import dataclass
from typing import Any

from ..settings import DEPLOYMENT_NAME, NAMESPACE

logger = logging.getLogger(__name__)

#: (first, longest) wait in seconds before a request that found every worker full looks again.
#: Serve polls for a free replica (it is not told when one frees up); its default of up to 0.5 s
#: left workers idle between LLM batches (measured: SmolLM2 via SQL fell to 0.86 of in-process).
ROUTER_BACKOFF_S = (0.005, 0.05)


def build(config) -> Any:
    """The Serve application of ``config`` (a :class:`~byzerllm_spark.config.DeployConfig`), not started."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .replica import SPARE_SLOTS, ModelWorker, work_slots
    from .router import ROUND_ROBIN_ROUTER, LRURequestRouter

    router = LRURequestRouter if config.load_balance == "lru" else ROUND_ROBIN_ROUTER
    slots = work_slots(config)
    router_kwargs = {"work_slots": slots} if config.load_balance == "lru" else {}
    return (
        serve.deployment(ModelWorker)
        .options(
            name=DEPLOYMENT_NAME,
            **({"autoscaling_config": config.serve_autoscaling_config()} if config.autoscaling
               else {"num_replicas": config.num_workers}),
            # Spare slots beyond the model's: a request whose body is still arriving holds one of these,
            # never a slot of the model (the worker takes those once the body is in hand).
            max_ongoing_requests=slots + SPARE_SLOTS,
            ray_actor_options={"num_cpus": config.cpus_per_worker, "num_gpus": config.gpus_per_worker,
                               **({"resources": dict(config.resources)} if config.resources else {})},
            request_router_config=RequestRouterConfig(
                request_router_class=router, initial_backoff_s=ROUTER_BACKOFF_S[0], max_backoff_s=ROUTER_BACKOFF_S[1],
                request_router_kwargs=router_kwargs,
            ),
            health_check_period_s=5,
            health_check_timeout_s=60,
            graceful_shutdown_timeout_s=5,
        )
        .bind(config)
    )


def logging_config() -> dict[str, Any]:
    """Serve's logging for our applications: the same as for Serve's controller and proxy (no access log;
    Serve's own messages at ERROR unless ``$BYZERLLM_LOG_LEVEL`` is INFO or DEBUG)."""
    from ..cluster import serve_logging_config

    return serve_logging_config()


@dataclass
class Start:
    """A start in progress: ``serve.run`` waits for the application in a thread, so the caller can
    show progress and give up after its own timeout (deleting the application ends the wait)."""

    done: threading.Event
    error: list

    @property
    def failed(self) -> BaseException | None:
        return self.error[0] if self.error else None


def start(config) -> Start:
    """Create the stats actor and start the application; returns at once (see :class:`Start`)."""
    import ray
    from ray import serve

    from .stats import StatsActor, stats_actor_name

    stats = StatsActor.options(
        name=stats_actor_name(config.model), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(config.model, pickle.dumps(config), config.load_balance, config.worker_concurrency,
             dict(getattr(config, "lora_adapters", {})))
    ray.get(stats.snapshot.remote())  # created and reachable before any replica reports
    app = build(config)
    state = Start(threading.Event(), [])

    def run() -> None:
        try:
            serve.run(app, name=config.model, route_prefix=f"/{config.model}", logging_config=logging_config())
        except BaseException as exc:  # reported by the caller's wait
            state.error.append(exc)
        finally:
            state.done.set()

    threading.Thread(target=run, name=f"byzerllm-start-{config.model}", daemon=True).start()
    return state


def replica_states(model: str) -> tuple[str | None, dict[str, int], str]:
    """``(application status, {replica state: count}, message)`` of a model's application."""
    from ray import serve

    status = serve.status().applications.get(model)
    if status is None:
        return None, {}, ""
    deployment = getattr(status, "deployments", {}).get(DEPLOYMENT_NAME)
    states = {str(k).split(".")[-1]: v for k, v in (getattr(deployment, "replica_states", None) or {}).items()}
    return str(status.status).split(".")[-1], states, failure_message(status)


def target_workers(model: str) -> int | None:
    """The worker count Serve is scaling a model's deployment to (running plus starting), None if unknown."""
    from ray import serve

    status = serve.status().applications.get(model)
    deployment = getattr(status, "deployments", {}).get(DEPLOYMENT_NAME) if status else None
    states = getattr(deployment, "replica_states", None)
    if states is None:
        return None
    return sum(n for state, n in states.items() if str(state).split(".")[-1] in ("RUNNING", "STARTING", "UPDATING"))


def failure_message(status) -> str:
    """The useful end of an application's status messages (a replica traceback's exception lines)."""
    parts = [status.message] if getattr(status, "message", "") else []
    for dep in getattr(status, "deployments", {}).values():
        if getattr(dep, "message", ""):
            parts.append(dep.message)
    lines = [line for line in " | ".join(parts).splitlines() if line.strip()]
    tail = [line for line in lines if "Error" in line or "error" in line][-3:]
    return " ".join(tail or lines[-3:])[:2000]


def deployed_models() -> list[str]:
    """Names of the applications that are models of this library, sorted."""
    from ray import serve

    apps = serve.status().applications
    return sorted(name for name, app in apps.items() if DEPLOYMENT_NAME in getattr(app, "deployments", {}))


def delete(model: str) -> None:
    """Remove the model's application and its stats actor (best effort)."""
    import ray
    from ray import serve

    from .stats import get_stats_actor

    try:
        serve.delete(model)
    except Exception:
        logger.debug("serve.delete(%r) failed", model, exc_info=True)
    actor = get_stats_actor(model)
    if actor is not None:
        ray.kill(actor, no_restart=True)


def lora_adapters(model: str) -> dict[str, str]:
    """A deployed model's LoRA adapters, ``{name: directory}`` (deploy's and those added since); {} if none."""
    import ray

    from .stats import get_stats_actor

    actor = get_stats_actor(model)
    return ray.get(actor.lora_adapters.remote()) if actor is not None else {}


def stored_config(model: str):
    """The DeployConfig a model was started with, or None when it was not deployed by this library."""
    import ray

    from .stats import get_stats_actor

    actor = get_stats_actor(model)
    if actor is None:
        return None
    return pickle.loads(ray.get(actor.config.remote()))
