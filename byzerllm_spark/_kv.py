"""A small key-value store of the cluster, in a named detached Ray actor (public Ray API only).

It holds what every driver and replica of one Ray cluster must agree on: the Serve endpoint, the
auth token's sha256, finetune jobs' progress. It lives as long as the cluster; values are bytes.
"""

from __future__ import annotations

from typing import Any

from .settings import NAMESPACE

ACTOR_NAME = "byzerllm_spark.kv"

_actor_class: Any = None


def _store():
    import ray

    global _actor_class
    if _actor_class is None:

        class Store:
            def __init__(self) -> None:
                self.values: dict[bytes, bytes] = {}

            def get(self, key: bytes) -> bytes | None:
                return self.values.get(key)

            def put(self, key: bytes, value: bytes) -> None:
                self.values[key] = value

            def delete(self, key: bytes) -> None:
                self.values.pop(key, None)

            def keys(self, prefix: bytes) -> list[bytes]:
                return sorted(k for k in self.values if k.startswith(prefix))

        _actor_class = ray.remote(num_cpus=0, max_restarts=-1)(Store)
    return _actor_class.options(
        name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def get(key: bytes) -> bytes | None:
    """The value of ``key``, or None."""
    import ray

    return ray.get(_store().get.remote(key))


def put(key: bytes, value: bytes) -> None:
    import ray

    ray.get(_store().put.remote(key, value))


def delete(key: bytes) -> None:
    import ray

    ray.get(_store().delete.remote(key))


def keys(prefix: bytes = b"") -> list[bytes]:
    import ray

    return ray.get(_store().keys.remote(prefix))
