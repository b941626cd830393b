"""``bls.clear_cache(model)``: forget a model's cached answers (the cache itself: ``serving/cache.py``)."""

from __future__ import annotations

from typing import Any

from .. import cluster
from ..config import CacheSpec
from ..serving import app as serve_app


def clear_cache(model: str, *, cache: Any = None) -> int:
    """Delete every answer of ``model`` kept by the response cache, so the next request is answered anew.

    Clears the deployment's store (its ``deploy(cache=...)``), the default folder store on every node of
    the cluster (where a model function's ``cache=True`` keeps answers of a deployment without one), and
    ``cache`` when given. Works for a model no longer deployed too. Answers of a changed model (new files,
    another SaaS model name) are never returned anyway: this frees their space and forces fresh answers.

    Args:
        model: the deployment's name.
        cache: another store to clear, in ``deploy(cache=...)``'s forms (``"redis://host:6379/0"``); default
            None: only the stores above.

    Returns:
        How many answers were deleted.

    Raises:
        ConfigError: ``cache`` is malformed (naming the accepted forms).
        ClusterError: Ray cannot be reached.

    Example:
        >>> bls.clear_cache("chat")  # doctest: +SKIP
        1600
    """
    import ray

    from ..serving.cache import clear_local

    extra = CacheSpec.parse(cache, "cache")
    cluster.ensure_init()
    deployed = serve_app.stored_config(model)
    uris: list[str | None] = [None]  # the default folder on each node
    for spec in (getattr(deployed, "cache", None), extra):
        if spec is not None and spec.store:
            uris.append(spec.store)
    local = [u for u in uris if u is None or u.startswith("diskcache://")]
    shared = [u for u in uris if u is not None and not u.startswith("diskcache://")]
    deleted = clear_local(model, shared) if shared else 0
    # Folder stores live on each node: clear them where they are, one task per live node.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0)(clear_local)
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(model, local)
            for node in ray.nodes() if node.get("Alive")]
    return deleted + sum(ray.get(refs))


__all__ = ["clear_cache"]
