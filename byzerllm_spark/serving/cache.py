"""The response cache: a worker answers a request it has answered before from a store, not the engine.

Opt in per deployment (``bls.deploy(..., cache=True)``) or per Spark function
(``register_model_function(..., cache=True)``); :class:`~byzerllm_spark.config.CacheSpec` is the parsed
setting. Where rows meet the engine (:meth:`ModelWorker.run_batch`), so Spark SQL, ``bls.chat`` and
``/v1/chat/completions`` all use it, and a Spark task that runs again (a retry, a re-run query after a
failure) sends upstream only the rows that were not answered yet.

- **Key**: sha256 of the model's identity (:func:`model_identity`: the model files' checksum, or the SaaS
  vendor, URL and model name; never the API key) and the canonical request (every field of the parsed
  :class:`~byzerllm_spark.protocol.request.ChatRequest`: instruction, history, system message, every
  sampling parameter, ``generation.*``), in the namespace of the deployment's name. A changed model has
  another identity, so it never gets an old answer; ``bls.clear_cache(model)`` deletes the namespace.
- **What**: by default only requests whose answer is fixed: ``temperature`` 0, a ``generation.seed``, or
  ``generation.do_sample=false``; mode ``always`` caches every request. Only answers without an error.
- **When**: each row as soon as it is answered (SaaS rows one by one, see ``backends.base.ANSWERED``;
  other engines when their batch returns), inside the engine's task, so rows answered for a caller that
  went away are kept too.
- **Where**: a diskcache folder (SQLite) on each worker's node by default (``<home>/response_cache``), or a
  Redis server that every node reaches (``redis://host:6379/0``; Valkey and other servers speaking its
  protocol too) for a cluster, or another folder (``diskcache:///dir``).
- **Streams** (``bls.stream_chat``, ``/v1`` with ``stream=true``) use the deployment's cache too: a hit
  comes as one piece, a streamed answer is kept once it is whole.
- **Shown**: a row from the cache has ``metadata["cache"] = "hit"`` (and no token counts: it cost none),
  a cacheable row answered by the engine ``"miss"``, another row ``"skip"``; ``bls.stat(model)`` counts
  ``cache_hits`` and ``cache_misses``. A store that fails is logged and skipped: it never fails a request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
from typing import Any, Awaitable, Callable

import orjson

from ..backends.base import ANSWERED, ChatResult
from ..config import CacheSpec, is_secret_key, redact_uri
from ..settings import response_cache_dir

logger = logging.getLogger("byzerllm_spark.cache")

#: Key prefix of every entry in a Redis store: ``byzerllm:rc:<model>:<sha256>``.
REDIS_PREFIX = "byzerllm:rc:"
#: Metadata of the first answer that a hit leaves out: what that call cost, not this one.
_COST_KEYS = ("prompt_tokens", "completion_tokens", "retries")
#: Seconds between two warnings about a failing store (one per batch would flood the log).
_WARN_EVERY_S = 60.0


def store_uri(spec: CacheSpec | None) -> str:
    """The store a spec names: its URI, or this node's default folder."""
    return (spec.store if spec is not None and spec.store else None) or "diskcache://" + response_cache_dir()


class DiskStore:
    """A diskcache ``Cache`` (SQLite and files) in one folder of this node; safe across processes."""

    def __init__(self, path: str) -> None:
        try:
            import diskcache
        except ImportError:
            raise ImportError("the response cache needs diskcache: pip install 'byzerllm-spark[cache]'") from None
        self.path = path
        # tag_index: clear() deletes one model's entries by tag without scanning the others.
        self._cache = diskcache.Cache(path, tag_index=True)

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        get = self._cache.get
        return [get(key) for key in keys]

    def set_many(self, items: list[tuple[str, bytes]], tag: str) -> None:
        with self._cache.transact():  # one SQLite transaction for the batch
            for key, value in items:
                self._cache.set(key, value, tag=tag)

    def clear(self, tag: str) -> int:
        return int(self._cache.evict(tag))

    def close(self) -> None:
        self._cache.close()

    def __repr__(self) -> str:
        return f"DiskStore({self.path!r})"


class RedisStore:
    """A Redis (or Valkey) server that every node reaches: ``redis://[:password@]host:port/db``."""

    def __init__(self, uri: str) -> None:
        try:
            import redis
        except ImportError:
            raise ImportError("a redis:// response cache needs redis-py: pip install 'byzerllm-spark[cache]'") from None
        self.uri = uri
        self._client = redis.Redis.from_url(uri, socket_timeout=10, socket_connect_timeout=5)

    @staticmethod
    def _key(key: str) -> str:
        return REDIS_PREFIX + key

    def get_many(self, keys: list[str]) -> list[bytes | None]:
        return list(self._client.mget([self._key(k) for k in keys])) if keys else []

    def set_many(self, items: list[tuple[str, bytes]], tag: str) -> None:
        if items:
            self._client.mset({self._key(k): v for k, v in items})

    def clear(self, tag: str) -> int:
        deleted, batch = 0, []
        for key in self._client.scan_iter(match=f"{REDIS_PREFIX}{tag}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += self._client.unlink(*batch)
                batch = []
        if batch:
            deleted += self._client.unlink(*batch)
        return int(deleted)

    def close(self) -> None:
        self._client.close()

    def __repr__(self) -> str:
        return f"RedisStore({redact_uri(self.uri)!r})"


_stores: dict[str, Any] = {}
_stores_lock = threading.Lock()


def open_store(uri: str):
    """This process's store for ``uri`` (opened once): a :class:`DiskStore` or a :class:`RedisStore`."""
    with _stores_lock:
        store = _stores.get(uri)
        if store is None:
            if uri.startswith("diskcache://"):
                store = DiskStore(uri[len("diskcache://"):])
            else:
                store = RedisStore(uri)
            _stores[uri] = store
        return store


def model_identity(config, backend_name: str, model_dir: str | None) -> str:
    """What makes this deployment's answers this model's: a sha256 of the model type, the engine, the
    model files' checksum (or the SaaS vendor, base URL and model name) and the engine's non-secret
    ``infer_params``. Secrets (``saas.api_key``, headers) never take part."""
    identity: dict[str, Any] = {"type": config.pretrained_model_type, "engine": backend_name}
    if config.is_saas:
        from ..backends.saas import SaasOptions

        options = SaasOptions.from_config(config)
        identity.update(vendor=options.vendor, base_url=options.base_url, model=options.model,
                        embedding=options.embedding)
    else:
        from ..backends._model_files import files_digest

        identity["files"] = files_digest(model_dir) if model_dir else None
        params = config.infer_params
        identity["params"] = {f"{prefix}{k}": str(v) for prefix, values in (("", params.plain), ("backend.", params.backend))
                              for k, v in sorted(values.items()) if not is_secret_key(k)}
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


_fields: tuple[str, ...] = ()


def canonical(request) -> bytes:
    """Every field of a parsed request, in field order (generation keys sorted): equal requests, equal bytes."""
    global _fields
    if not _fields:
        _fields = tuple(f.name for f in dataclasses.fields(type(request)))
    return orjson.dumps([getattr(request, name) for name in _fields], option=orjson.OPT_SORT_KEYS, default=repr)


def deterministic(request) -> bool:
    """True when the request's answer is fixed: temperature 0, a ``generation.seed``, or ``do_sample`` false."""
    if request.temperature == 0:
        return True
    generation = request.generation
    if generation.get("seed") not in (None, ""):
        return True
    return str(generation.get("do_sample", "")).strip().lower() in ("false", "0")


class ResponseCache:
    """One worker's cache of one store and mode: looks rows up, answers the rest with the engine, keeps them."""

    def __init__(self, spec: CacheSpec, model: str, identity: str) -> None:
        self.spec = spec
        self.model = model
        self.uri = store_uri(spec)
        self.store = open_store(self.uri)
        self._prefix = hashlib.sha256(f"{model}\0{identity}\0".encode()).digest()
        self.hits = 0
        self.misses = 0
        self._warned = 0.0

    def key(self, request) -> str | None:
        """The request's key, or None when this cache does not keep it (a sampled request in mode
        ``deterministic``)."""
        if self.spec.mode != "always" and not deterministic(request):
            return None
        return f"{self.model}:{hashlib.sha256(self._prefix + canonical(request)).hexdigest()}"

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY_S:
            self._warned = now
            logger.warning("response cache %r of model %r: %s failed (%s: %s); answering without it",
                           self.store, self.model, what, type(exc).__name__, redact_uri(str(exc))[:300])

    async def lookup(self, key: str) -> ChatResult | None:
        """The kept answer of ``key`` (marked ``cache=hit``), or None."""
        try:
            (value,) = await asyncio.to_thread(self.store.get_many, [key])
        except Exception as exc:
            self._warn("a lookup", exc)
            return None
        hit = _decode(value) if value is not None else None
        self.hits += hit is not None
        return hit

    async def keep(self, key: str, result: ChatResult) -> None:
        """Keep ``result`` (an answer without error) under ``key``."""
        try:
            await asyncio.to_thread(self.store.set_many, [(key, _encode(result))], self.model)
            self.misses += 1
        except Exception as exc:
            self._warn("a write", exc)

    async def answer(self, requests: list, engine: Callable[[list], Awaitable[list[ChatResult]]]) -> list[ChatResult]:
        """``requests`` answered from the store where it has them, the others by ``engine`` (the backend's
        ``chat_batch``), each kept as soon as it is answered."""
        keys = [self.key(r) for r in requests]
        wanted = [k for k in keys if k is not None]
        found: dict[str, bytes] = {}
        if wanted:
            try:
                values = await asyncio.to_thread(self.store.get_many, wanted)
                found = {k: v for k, v in zip(wanted, values) if v is not None}
            except Exception as exc:
                self._warn("a lookup", exc)
        results: list[ChatResult | None] = [None] * len(requests)
        misses: list[int] = []
        for i, key in enumerate(keys):
            value = found.get(key) if key is not None else None
            hit = _decode(value) if value is not None else None
            if hit is not None:
                results[i] = hit
            else:
                misses.append(i)
        self.hits += len(requests) - len(misses)
        if not misses:
            return results  # type: ignore[return-value]
        loop = asyncio.get_running_loop()
        pending: list[asyncio.Future] = []
        kept: set[int] = set()

        def keep(items: list[tuple[str, bytes]]) -> None:
            try:
                self.store.set_many(items, self.model)
            except Exception as exc:
                self._warn("a write", exc)

        def answered(j: int, result: ChatResult) -> None:  # backends.base.ANSWERED: one row is done
            i = misses[j] if 0 <= j < len(misses) else None
            if i is None or i in kept or keys[i] is None or result.error is not None:
                return
            kept.add(i)
            pending.append(loop.run_in_executor(None, keep, [(keys[i], _encode(result))]))

        token = ANSWERED.set(answered)
        try:
            answers = await engine([requests[i] for i in misses])
        except Exception as exc:
            if len(misses) == len(requests):
                raise
            logger.exception("backend failed a batch of %d", len(misses))  # the hits are still answers
            answers = [ChatResult(error=f"{type(exc).__name__}: {exc}")] * len(misses)
        finally:
            ANSWERED.reset(token)
        rest = []
        for i, result in zip(misses, answers):
            if keys[i] is None:
                results[i] = _marked(result, "skip")
                continue
            if result.error is None:
                self.misses += 1
                if i not in kept:
                    rest.append((keys[i], _encode(result)))
            results[i] = _marked(result, "miss")
        if rest:
            pending.append(loop.run_in_executor(None, keep, rest))
        if pending:
            await asyncio.gather(*pending)
        return results  # type: ignore[return-value]


def _encode(result: ChatResult) -> bytes:
    return orjson.dumps([result.response, result.metadata])


def _decode(value: bytes) -> ChatResult | None:
    try:
        response, metadata = orjson.loads(value)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None  # an entry of another format: answered again, and replaced
    meta = {k: v for k, v in (metadata or {}).items() if k not in _COST_KEYS}
    meta["cache"] = "hit"
    return ChatResult(response=response, metadata=meta)


def _marked(result: ChatResult, how: str) -> ChatResult:
    return ChatResult(response=result.response, error=result.error, metadata={**result.metadata, "cache": how})


def clear_local(model: str, uris: list[str]) -> int:
    """Delete ``model``'s entries from each store of ``uris`` as this node sees it (the default folder
    resolved here); returns how many were deleted."""
    deleted = 0
    for uri in dict.fromkeys(u or store_uri(None) for u in uris):
        if uri.startswith("diskcache://"):
            import os

            if not os.path.isdir(uri[len("diskcache://"):]):
                continue
        deleted += open_store(uri).clear(model)
    return deleted


__all__ = ["DiskStore", "RedisStore", "ResponseCache", "canonical", "clear_local", "deterministic",
           "model_identity", "open_store", "store_uri"]
