"""Request routers for Serve: LRU (Byzer-LLM's default) and round robin.

Each router instance lives in a Serve proxy or a deployment handle and sees every request routed
through it. The LRU router ranks replicas by when it last gave them work, oldest first, so idle
workers are used before busy ones and load spreads evenly; a replica that is full is skipped by
Serve's own capacity check and the next rank is tried. Serve lets a few spare requests into each
replica (their bodies are read before they take one of the model's slots, see ``replica.SPARE_SLOTS``),
so replicas whose model slots are all taken (by Serve's queue-length cache) rank after the others.
"""

from __future__ import annotations

import time
from typing import List, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

ROUND_ROBIN_ROUTER = "ray.serve.experimental.round_robin_router.RoundRobinRouter"


class LRURequestRouter(FIFOMixin, RequestRouter):
    """Least-recently-used: the replica that has waited longest for work goes first."""

    def initialize_state(self, work_slots: int = 1, **kwargs) -> None:
        self._last_routed: dict = {}
        self._work_slots = work_slots

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if pending_request is not None:
            # Back off between rounds when every replica is full instead of spinning.
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        last = self._last_routed
        if len(last) > len(candidate_replicas) + 16:  # workers removed by autoscaling are forgotten
            live = {r.replica_id for r in candidate_replicas}
            for replica_id in [k for k in last if k not in live]:
                del last[replica_id]
        queue_lens = self.replica_queue_len_cache

        def full(replica) -> bool:
            queued = queue_lens.get(replica.replica_id)
            return queued is not None and queued >= self._work_slots

        ranked = sorted(candidate_replicas, key=lambda r: (full(r), last.get(r.replica_id, 0.0)))
        # Requests that arrive together are ranked before any of them is routed: claim the first
        # pick now, or they all go to the same replica whenever it has room for more than one.
        last[ranked[0].replica_id] = time.monotonic()
        return [[replica] for replica in ranked]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        self._last_routed[replica_id] = time.monotonic()

    def on_replica_actor_died(self, replica_id) -> None:
        self._last_routed.pop(replica_id, None)
        super().on_replica_actor_died(replica_id)
