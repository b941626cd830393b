"""Live counters of every worker of one model, for ``stat()`` (Byzer-LLM's fields).

Each replica reports its counters to this small actor when a batch starts and ends (fire and
forget, so the request path never waits on it). ``stat()`` reads them and drops replicas whose
actor is gone, so a worker killed by hand disappears and its replacement shows up.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from ..settings import NAMESPACE

SERVE_NAMESPACE = "serve"


def stats_actor_name(model: str) -> str:
    return f"byzerllm_spark.stats.{model}"


@ray.remote(num_cpus=0, max_restarts=-1)
class StatsActor:
    def __init__(self, model: str, config_blob: bytes, strategy: str, max_concurrency: int,
                 adapters: dict[str, str] | None = None) -> None:
        self.model = model
        #: The deployment's LoRA adapters, {name: directory}: deploy's, then each bls.add_adapter's. Workers
        #: load them at start and look here again when a row names one they do not have.
        self.adapters: dict[str, str] = dict(adapters or {})
        self.config_blob = config_blob
        self.strategy = strategy
        self.max_concurrency = max_concurrency
        self.replicas: dict[str, dict[str, Any]] = {}
        self.created = time.time()

    def report(self, replica: str, snapshot: dict[str, Any]) -> None:
        current = self.replicas.get(replica)
        # Reports are fire-and-forget and may arrive out of order; keep the newest.
        if current is None or snapshot["seq"] >= current["seq"]:
            self.replicas[replica] = snapshot

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def snapshot(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "strategy": self.strategy,
            "max_concurrency": self.max_concurrency,
            "replicas": dict(self.replicas),
            "now": time.time(),
        }

    def config(self) -> bytes:
        return self.config_blob

    def lora_adapters(self) -> dict[str, str]:
        return dict(self.adapters)

    def register_adapter(self, name: str, path: str) -> dict[str, str]:
        self.adapters[name] = path
        return dict(self.adapters)


def get_stats_actor(model: str):
    """The model's stats actor, or None when the model was not deployed by this library."""
    try:
        return ray.get_actor(stats_actor_name(model), namespace=NAMESPACE)
    except ValueError:
        return None


def replica_alive(full_id: str) -> bool:
    try:
        ray.get_actor(full_id, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False
