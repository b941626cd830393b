"""The Serve replica: one worker of a deployed model.

It is its own HTTP ingress (route prefix ``/{model}``), so a Spark batch goes proxy → replica with
no extra hop. Routes:

- ``POST /{model}/arrow``  Arrow IPC in, Arrow IPC out (the contract in ``protocol/arrow.py``)
- ``POST /{model}/embed``  Arrow IPC in (``params``: text or request JSON), embeddings out
- ``POST /{model}/tokenize`` Arrow IPC in (the same), each text's token count out (nothing generated)
- ``POST /{model}/stream`` one request as JSON in, server-sent events out (``bls.stream_chat``)
- ``GET  /{model}/info``   backend, model dir, replica id (JSON)

With ``bls.init(auth_token=...)`` every route needs ``Authorization: Bearer <token>``. The OpenAI
app (``openai.py``) reaches the same replicas through deployment handles (``chat_batch``,
``stream_chat``, ``embed_rows``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from typing import Any

from ..auth import authorized, stored_digest, unauthorized_response
from ..backends import registry
from ..backends.base import STOP, ChatResult, check_structured, error_result
from ..errors import ConfigError, RequestParseError, RequestRefusedError, answer_status
from ..protocol import arrow, sse
from ..protocol.request import DEFAULT_MAX_LENGTH, parse_request
from ..settings import CACHE_HEADER

logger = logging.getLogger("byzerllm_spark.worker")

#: A request body larger than this is refused with 413 before it is read (a Spark batch of 5000 long
#: prompts is a few MB; lower batch_size for more).
MAX_BODY_BYTES = 256 << 20
#: A body must be in hand within this many seconds of the request's arrival, else 408. The worker's
#: slots are taken only after that (a stalled upload holds one of Serve's spare slots, never a slot
#: of the model), so this bounds how long a stalled client holds anything.
BODY_TIMEOUT_S = 30.0
#: Serve slots per worker beyond its work slots: requests whose bodies are being read, or that wait
#: for a work slot. Two stalled uploads per worker leave room for everyone else.
SPARE_SLOTS = 4
#: Requests a SaaS worker holds per upstream slot: it only waits on the network, so the next batch is
#: already there when one ends instead of waiting out the router's backoff.
SAAS_QUEUE_DEPTH = 4


def work_slots(config) -> int:
    """Requests a worker works on at once: ``worker_concurrency``; a SaaS worker holds
    ``SAAS_QUEUE_DEPTH`` per slot (it only waits on the network)."""
    return config.worker_concurrency * (SAAS_QUEUE_DEPTH if config.is_saas else 1)


def resolve_model_dir(config) -> str | None:
    """The local model directory this worker loads (materialising a model table if needed)."""
    from ..backends._model_files import default_model_dir

    if config.model_table:
        from ..model_table import load_model_table

        return load_model_table(config.model_table, cache_dir=config.local_path_prefix)
    if config.model_path:
        return config.model_path
    if config.pretrained_model_type != "custom/auto":  # SaaS and plugins: no default model to load
        return None
    if config.infer_backend == "embedding":
        from ..backends.embedding_backend import default_embedding_dir

        return default_embedding_dir()
    return default_model_dir()


class ModelWorker:
    """One replica. Built by Serve with the pickled :class:`DeployConfig`."""

    def __init__(self, config) -> None:
        from ray import serve

        from .stats import get_stats_actor

        self.config = config
        started = time.time()
        self.model_dir = resolve_model_dir(config)
        self.backend = registry.build(config, self.model_dir)
        self.generation_defaults = dict(config.infer_params.generation)
        try:
            context = serve.get_replica_context()
            self.replica = context.replica_id.to_full_id_str()
        except Exception:  # not inside Serve (tests calling the class directly)
            self.replica = f"local-{os.getpid()}"
        self._stats = get_stats_actor(config.model)
        # LoRA adapters loaded into the backend, {name: directory}: deploy's now; those added later with
        # bls.add_adapter when a row first names one (the stats actor keeps the deployment's list).
        self._adapters: dict[str, str] = {}
        self._adapter_lock = asyncio.Lock()
        for name, path in getattr(config, "lora_adapters", {}).items():
            self._load_adapter(name, path)
        # The model's slots, taken once a request is read and parsed: Serve lets SPARE_SLOTS more
        # requests in, so slow uploads wait here without blocking the model (see app.build).
        self._slots = asyncio.Semaphore(work_slots(config))
        self._seq = 0
        self._in_flight = 0
        self._total = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._auth = _auth_digest()
        self._started = started
        self._last_work = time.time()
        self._load_seconds = time.time() - started
        self._caches: dict = {}  # CacheSpec -> ResponseCache: the deployment's, and those functions ask for
        self._identity: str | None = None
        if getattr(config, "cache", None) is not None:
            self._response_cache(config.cache)  # the model's checksum now, not on the first request
        self._report()
        logger.info("worker %s ready: %s in %.1fs", self.replica, self.backend.name, self._load_seconds)

    # ---- counters -------------------------------------------------------------------------
    def _report(self) -> None:
        if self._stats is None:
            return
        self._seq += 1
        snapshot = {
            "seq": self._seq,
            "in_flight": self._in_flight,
            "total_requests": self._total,
            "last_work_time": self._last_work,
            "started": self._started,
            "pid": os.getpid(),
            "node_ip": _node_ip(),
            "backend": self.backend.name,
            "load_seconds": self._load_seconds,
            "prompt_tokens": self._prompt_tokens,
            "completion_tokens": self._completion_tokens,
        }
        if self._caches:  # stat() shows the cache's counters where a cache is in use
            snapshot["cache_hits"] = sum(c.hits for c in self._caches.values())
            snapshot["cache_misses"] = sum(c.misses for c in self._caches.values())
        try:
            self._stats.report.remote(self.replica, snapshot)
        except Exception:  # stats must never fail a request
            logger.debug("stats report failed", exc_info=True)

    @contextlib.asynccontextmanager
    async def _busy(self, rows: int):
        """Takes one of the worker's slots (waiting for one) and counts the request in flight for
        ``stat()`` while the block runs, and ``rows`` answered after, unless the caller went away
        (Serve cancelled the request, or a stream was closed before its end): those rows were
        answered to nobody, so ``total_requests`` does not count them.

        The block may hand the slot to the engine's task (``slot.engine``, see :meth:`_until_done`
        and :meth:`_stream`): when the caller goes away while that task still runs, the slot is
        freed when the task ends, not here. Nothing here awaits after a cancellation: inside a
        cancelled anyio scope (Starlette's streaming response, when its client disconnects) every
        await is cancelled again at once, so a wait here would free the slot while the engine works.
        """
        await self._slots.acquire()
        self._in_flight += 1
        self._report()
        slot = _Slot()
        gone = False
        try:
            yield slot
        except (asyncio.CancelledError, GeneratorExit):
            gone = True
            raise
        finally:
            engine = slot.engine
            if gone and engine is not None and not engine.done():
                engine.add_done_callback(lambda _: self._free(rows, answered=False))
            else:
                self._free(rows, answered=not gone)

    def _free(self, rows: int, answered: bool) -> None:
        """Gives a slot of :meth:`_busy` back, counting ``rows`` answered if they were."""
        self._in_flight -= 1
        if answered:
            self._total += rows
        self._last_work = time.time()
        self._slots.release()
        self._report()

    async def _until_done(self, make, slot: "_Slot"):
        """Await the engine's work ``make()`` with a stop signal (``backends.base.STOP``). When the caller
        goes away (Serve cancels this request), the engine is told to stop and keeps the slot until it
        has (``slot.engine``), so ``stat()`` shows the worker busy exactly as long as it works."""
        stop = threading.Event()
        token = STOP.set(stop)
        try:
            task = asyncio.ensure_future(make())  # the task (and its threads) see this request's STOP
        finally:
            STOP.reset(token)
        slot.engine = task
        task.add_done_callback(_retrieve)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.set()
            raise

    def _stream(self, request, slot: "_Slot"):
        """The engine's stream of ``request`` driven by a task of its own, the slot's engine: items come
        through a queue (one ahead, as the engine is pulled). The consumer going away cancels that task
        once; the engine's generator then closes in it (each backend stops in its own ``finally``),
        and the slot is freed when it has (see :meth:`_busy`)."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)

        async def produce() -> None:
            pieces = self.backend.stream_chat(request)
            try:
                async for piece in pieces:
                    await queue.put(piece)
                await queue.put(_END)
            except Exception as exc:  # the consumer reports it
                await queue.put(exc)
            finally:
                await pieces.aclose()

        slot.engine = task = asyncio.ensure_future(produce())
        task.add_done_callback(_retrieve)

        async def items():
            try:
                while True:
                    item = await queue.get()
                    if item is _END:
                        break
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                task.cancel()  # a no-op once it ended; no await: see _busy

        return items()

    def _context_error(self, request) -> str | None:
        """Why ``request`` asks for more tokens than the model's context holds, or None."""
        context = self.backend.context_length
        if not context:
            return None
        if request.max_length == DEFAULT_MAX_LENGTH > context:  # not set: as much as the context holds
            request.max_length = context
        if not request.generation and type(request.max_length) is int and request.max_length <= context:
            return None  # most rows: nothing more to check
        for name, value in (("max_length", request.max_length),
                            ("generation.max_new_tokens", request.generation.get("max_new_tokens")),
                            ("generation.min_new_tokens", request.generation.get("min_new_tokens"))):
            if isinstance(value, str) and value.strip().isdigit():  # SQL maps carry strings
                value = int(value)
            if isinstance(value, int) and not isinstance(value, bool) and value > context:
                return (f"{name}={value!r} is more than model {self.config.model!r} can generate: its context "
                        f"holds {context} tokens; pass {name} <= {context}")
        return None

    # ---- LoRA adapters --------------------------------------------------------------------
    def _load_adapter(self, name: str, path: str) -> None:
        """Load one adapter into the backend (once), within ``max_loras``."""
        from ..config import check_adapter_name

        check_adapter_name(name)
        known = self._adapters.get(name)
        if known is not None:
            if known != path:
                raise ConfigError(f"adapter {name!r} of model {self.config.model!r} is already {known!r}; "
                                  f"add {path!r} under another name")
            return
        if len(self._adapters) >= self.config.max_loras:
            raise ConfigError(f"max_loras={self.config.max_loras}: model {self.config.model!r} already holds "
                              f"{len(self._adapters)} adapters ({', '.join(sorted(self._adapters))}); deploy it again "
                              "with a higher max_loras, or with fewer adapters")
        self.backend.load_adapter(name, _adapter_dir(path, self.config.local_path_prefix))
        self._adapters[name] = path
        logger.info("worker %s: adapter %r loaded from %s", getattr(self, "replica", "?"), name, path)

    async def _have_adapters(self, names: set) -> None:
        """Load the adapters among ``names`` that were added to the deployment since this worker started."""
        missing = {n for n in names if n not in self._adapters}
        if not missing or self._stats is None:
            return
        async with self._adapter_lock:
            registered = await self._stats.lora_adapters.remote()
            for name in sorted(missing):
                if name in registered and name not in self._adapters:
                    try:
                        await asyncio.to_thread(self._load_adapter, name, registered[name])
                    except Exception as exc:  # its rows say the adapter is unknown; the reason is logged
                        logger.warning("adapter %r could not be loaded: %s", name, exc)

    def _unknown_adapter(self, name: str) -> str:
        return (f"adapter={name!r} is not an adapter of model {self.config.model!r}; available: "
                f"{', '.join(sorted(self._adapters)) or 'none'}. Leave 'adapter' out for the base model, or add it "
                f"with bls.add_adapter({self.config.model!r}, {name!r}, '/path/to/adapter')")

    async def add_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Handle method (``bls.add_adapter``): load an adapter here; ``{"adapters": [...]}`` or ``{"error": ...}``."""
        try:
            async with self._adapter_lock:
                await asyncio.to_thread(self._load_adapter, name, path)
        except Exception as exc:
            return {"error": str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"}
        return {"adapters": sorted(self._adapters)}

    # ---- the response cache ---------------------------------------------------------------
    def _response_cache(self, spec):
        """The worker's :class:`~.cache.ResponseCache` for ``spec`` (opened once)."""
        from .cache import ResponseCache, model_identity

        cache = self._caches.get(spec)
        if cache is None:
            if self._identity is None:
                self._identity = model_identity(self.config, self.backend.name, self.model_dir)
            cache = self._caches[spec] = ResponseCache(spec, self.config.model, self._identity)
        return cache

    def _cache_of(self, override: Any):
        """The cache a batch uses: a model function's own ``cache=`` (the Arrow route's header: a spec,
        or ``off``), else the deployment's; None: no cache. A function's ``cache=True`` without a store
        uses the deployment's store."""
        spec = getattr(self.config, "cache", None)
        if override == "off":
            return None
        if override is not None:
            from ..config import CacheSpec

            asked = CacheSpec.parse(override if isinstance(override, (CacheSpec, dict)) else _json_or_text(override),
                                    "cache")
            if asked is not None and asked.store is None and spec is not None:
                asked = CacheSpec(mode=asked.mode, store=spec.store)
            if asked is not None and asked.store and asked.store.startswith("diskcache://") and (
                    spec is None or asked.store != spec.store):
                # A caller never makes a worker write to a folder it names: folders are chosen at deploy().
                raise ConfigError(f"cache={asked!r} is not valid for a model function: a diskcache folder is "
                                  "chosen with deploy(cache=...); pass cache=True, 'always' or a redis:// URI")
            spec = asked
        if spec is None:
            return None
        try:
            return self._response_cache(spec)
        except Exception as exc:  # a store that cannot be opened never fails the request
            logger.warning("response cache %r of model %r cannot be opened (%s: %s); answering without it",
                           spec, self.config.model, type(exc).__name__, str(exc)[:300])
            return None

    async def _answer(self, requests: list, cache) -> list[ChatResult]:
        """The engine's answers to ``requests``, through ``cache`` when there is one."""
        if cache is None:
            return await self.backend.chat_batch(requests)
        return await cache.answer(requests, self.backend.chat_batch)

    # ---- the work -------------------------------------------------------------------------
    async def run_batch(self, params: list[Any], cache: Any = None) -> list[ChatResult | None]:
        """Answer a batch of requests (dicts or JSON text; None rows stay None), in order. ``cache``: a model
        function's own cache setting (see :meth:`_cache_of`)."""
        response_cache = self._cache_of(cache)
        results: list[ChatResult | None] = [None] * len(params)
        todo_idx: list[int] = []
        todo: list = []
        defaults = self.generation_defaults
        context_error, check_request = self._context_error, self.backend.check_request
        for i, item in enumerate(params):  # parsed before a slot is taken
            if item is None:
                continue
            try:
                request = parse_request(item, defaults)
                if request is not None:
                    too_long = context_error(request)
                    if too_long:
                        results[i] = ChatResult(error=too_long, metadata={"http_status": "400", "param": "max_tokens"})
                        continue
                    check_request(request)
                    todo.append(request)
                    todo_idx.append(i)
            except RequestRefusedError as exc:  # the engine does not do what the row asks: a 400 naming it
                results[i] = error_result(exc)
            except RequestParseError as exc:
                results[i] = ChatResult(error=str(exc))
            except Exception as exc:  # any other malformed row (too deep, too big): that row's error alone
                results[i] = ChatResult(error=_malformed(exc))
        named = {r.adapter for r in todo if r.adapter is not None}
        if named:
            await self._have_adapters(named)
            if not named <= self._adapters.keys():
                kept = [(i, r) for i, r in zip(todo_idx, todo) if r.adapter is None or r.adapter in self._adapters]
                for i, r in zip(todo_idx, todo):
                    if r.adapter is not None and r.adapter not in self._adapters:
                        results[i] = ChatResult(error=self._unknown_adapter(r.adapter),
                                                metadata={"http_status": "404", "code": "model_not_found"})
                todo_idx, todo = [i for i, _ in kept], [r for _, r in kept]
        async with self._busy(len(params)) as slot:
            if todo:
                try:
                    answers = await self._until_done(lambda: self._answer(todo, response_cache), slot)
                except Exception as exc:  # the engine failed the whole batch: each row says why
                    logger.exception("backend %s failed a batch of %d", self.backend.name, len(todo))
                    answers = [ChatResult(error=f"{type(exc).__name__}: {exc}")] * len(todo)
                for i, request, answer in zip(todo_idx, todo, answers):
                    if request.response_format is not None:
                        answer = check_structured(request, answer)
                    results[i] = answer
                    self._count_usage(answer.metadata)
            return results

    def _count_usage(self, metadata: dict | None) -> None:
        if metadata and "completion_tokens" in metadata:  # once per row: answers without usage cost nothing
            self._prompt_tokens += _tokens(metadata.get("prompt_tokens"))
            self._completion_tokens += _tokens(metadata["completion_tokens"])

    async def stream_chat(self, params: Any):
        """Handle method (streaming): one request in; yields ``{"text": piece}`` items, then
        ``{"metadata": {...}}``, or ``{"error": message, "status": http_status}`` instead."""
        try:
            request = parse_request(params, self.generation_defaults)
        except RequestParseError as exc:
            yield {"error": str(exc), "status": 400}
            return
        except Exception as exc:
            yield {"error": _malformed(exc), "status": 400}
            return
        if request is None:
            yield {"error": "the request's instruction is null", "status": 400}
            return
        too_long = self._context_error(request)
        if too_long:
            yield {"error": too_long, "status": 400, "param": "max_tokens"}
            return
        try:
            self.backend.check_request(request)
        except RequestRefusedError as exc:
            yield _error_item(exc)
            return
        if request.adapter is not None and request.adapter not in self._adapters:
            await self._have_adapters({request.adapter})
            if request.adapter not in self._adapters:
                yield {"error": self._unknown_adapter(request.adapter), "status": 404, "code": "model_not_found"}
                return
        cache = self._cache_of(None)
        key = cache.key(request) if cache is not None else None
        if key is not None:
            hit = await cache.lookup(key)
            if hit is not None:  # the whole answer as one piece, as a backend that does not stream sends it
                async with self._busy(1):
                    pass
                if hit.response:
                    yield {"text": hit.response}
                yield {"metadata": hit.metadata}
                return
        texts: list[str] = []
        metadata: dict[str, str] = {}
        last: dict[str, Any] = {"metadata": metadata}
        async with self._busy(1) as slot:
            # A caller that went away closes this generator: the engine's stream stops in its own task,
            # which holds the slot (stat busy) until it has.
            pieces = self._stream(request, slot)
            try:
                async for piece in pieces:
                    if isinstance(piece, ChatResult):  # a backend's closing item: usage and finish reason
                        metadata.update(piece.metadata)
                    elif piece:
                        if key is not None:
                            texts.append(str(piece))
                        yield {"text": str(piece)}
                self._count_usage(metadata)
            except Exception as exc:  # the caller gets the error as an item; the replica goes on
                last = _error_item(exc)
            finally:
                await pieces.aclose()  # the consumer side: no engine work is awaited here
        if key is not None and "error" not in last:  # a whole answer: kept before its last item goes out
            await cache.keep(key, ChatResult(response="".join(texts), metadata=dict(metadata)))
            metadata["cache"] = "miss"
        # The answer is complete (the request counted answered) before its last item goes out: a
        # consumer that stops once it has the metadata or the error is no caller that went away.
        yield last

    async def embed_rows(self, texts: list[str]) -> dict[str, Any]:
        """Handle method: ``{"embeddings": [...]}`` or ``{"error": message, "status": code}``."""
        if not self.backend.supports_embedding:
            return {
                "error": f"model {self.config.model!r} ({self.backend.name}) does not compute embeddings; deploy an "
                "embedding model (infer_backend='embedding', or saas.embedding=true)",
                "status": 400,
            }
        async with self._busy(len(texts)) as slot:
            try:
                return {"embeddings": await self._until_done(lambda: self.backend.embed_batch(list(texts)), slot)}
            except Exception as exc:
                return _error_item(exc)

    async def chat_batch(self, params: list[Any]) -> list[dict | None]:
        """Handle method: the same as the Arrow route, with Python objects."""
        results = await self.run_batch(params)
        return [None if r is None else {"response": r.response, "error": r.error, "metadata": r.metadata} for r in results]

    def info(self) -> dict[str, Any]:
        out = self.backend.info()
        out.update(
            replica=self.replica,
            pid=os.getpid(),
            load_seconds=self._load_seconds,
            model=self.config.model,
            # The SQL function name the deploy asked for: the JVM bridge registers the model under it.
            udf_name=self.config.udf_name,
            # The most workers the model can have (max_workers when autoscaling): the Spark functions
            # keep that many slots' worth of requests in flight, so a busy model is seen to need more.
            num_workers=self.config.most_workers,
            min_workers=self.config.initial_workers,
            worker_concurrency=self.config.worker_concurrency,
            embedding=bool(self.backend.supports_embedding),
            adapters=sorted(self._adapters),
            preferred_batch_size=int(self.backend.preferred_batch_size),
        )
        return out

    # ---- HTTP -----------------------------------------------------------------------------
    #: The routes under ``/{model}``: (method, path after the prefix) -> handler method name.
    ROUTES = {
        ("POST", "/arrow"): "_arrow_http",
        ("POST", "/embed"): "_embed_http",
        ("POST", "/tokenize"): "_tokenize_http",
        ("POST", "/stream"): "_stream_http",
        ("GET", "/info"): "_info_http",
    }

    async def __call__(self, request):
        from starlette.responses import PlainTextResponse

        if self._auth and not authorized(request.headers, self._auth):
            return unauthorized_response()
        handler = self.ROUTES.get((request.method, _subpath(request)))
        if handler is None:
            routes = ", ".join(f"{method} /{self.config.model}{path}" for method, path in self.ROUTES)
            return PlainTextResponse(
                f"unknown route {request.method} {request.url.path}; this model serves {routes}", status_code=404
            )
        return await getattr(self, handler)(request)

    async def _arrow_http(self, request):
        from starlette.responses import PlainTextResponse, Response

        rows = await _request_rows(request)
        if not isinstance(rows, list):
            return rows
        try:
            results = await self.run_batch(rows, request.headers.get(CACHE_HEADER))
        except ConfigError as exc:  # a malformed cache header
            return PlainTextResponse(str(exc), status_code=400)
        responses = [None if r is None else r.response for r in results]
        errors = [None if r is None else r.error for r in results]
        metadata = [None if r is None else r.metadata for r in results]
        return Response(content=arrow.encode_results(responses, errors, metadata), media_type=arrow.CONTENT_TYPE)

    async def _info_http(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse(self.info())

    async def _stream_http(self, request):
        from starlette.responses import PlainTextResponse, StreamingResponse

        body = await _read_body(request)
        if not isinstance(body, bytes):
            return body
        try:
            params = json.loads(body)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested too deep
            return PlainTextResponse(f"the body is not JSON ({_malformed(exc)}); send one request as a JSON object",
                                     status_code=400)
        items = self.stream_chat(params)
        first = await items.__anext__()
        if "error" in first:
            await items.aclose()
            return PlainTextResponse(first["error"], status_code=first.get("status", 500))

        async def events():
            yield sse.event(first)
            async for item in items:
                yield sse.event(item)

        return StreamingResponse(events(), media_type=sse.MEDIA_TYPE)

    async def _embed_http(self, request):
        from starlette.responses import PlainTextResponse, Response

        rows = await _request_rows(request)
        if not isinstance(rows, list):
            return rows
        if not self.backend.supports_embedding:
            return PlainTextResponse(
                f"model {self.config.model!r} ({self.backend.name}) does not compute embeddings", status_code=400
            )
        texts, idx = _row_texts(rows)
        errors: list = [None] * len(rows)
        vectors: list = [None] * len(rows)
        async with self._busy(len(rows)) as slot:
            try:
                if texts:
                    for i, vec in zip(idx, await self._until_done(lambda: self.backend.embed_batch(texts), slot)):
                        vectors[i] = vec
            except Exception as exc:
                for i in idx:
                    errors[i] = f"{type(exc).__name__}: {exc}"
        return Response(content=arrow.encode_embeddings(vectors, errors), media_type=arrow.CONTENT_TYPE)

    async def _tokenize_http(self, request):
        """Token counts of the rows' texts with the model's own tokenizer, generating nothing: no worker slot
        is taken, so a count never waits behind the answers being generated."""
        from starlette.responses import Response

        rows = await _request_rows(request)
        if not isinstance(rows, list):
            return rows
        texts, idx = _row_texts(rows)
        counts: list = [None] * len(rows)
        errors: list = [None] * len(rows)
        try:
            if texts:
                for i, n in zip(idx, await self.backend.count_tokens(texts)):
                    counts[i] = n
        except Exception as exc:
            why = str(exc) if isinstance(exc, NotImplementedError) else f"{type(exc).__name__}: {exc}"
            for i in idx:
                errors[i] = f"model {self.config.model!r} ({self.backend.name}) cannot count tokens: {why}"
        return Response(content=arrow.encode_token_counts(counts, errors), media_type=arrow.CONTENT_TYPE)

    def __del__(self) -> None:
        try:
            self.backend.close()
        except Exception:
            pass


class _Slot:
    """One taken worker slot (:meth:`ModelWorker._busy`): ``engine`` is the task whose end frees it
    when its caller went away first."""

    __slots__ = ("engine",)

    def __init__(self) -> None:
        self.engine: asyncio.Future | None = None


#: The end of an engine stream in :meth:`ModelWorker._stream`'s queue.
_END = object()


def _retrieve(task: asyncio.Future) -> None:
    """An engine task's outcome, read so that one nobody awaited (its caller went away) logs nothing."""
    if not task.cancelled():
        task.exception()


async def _read_body(request):
    """The whole request body, read before the request takes a worker slot; or the error answer:
    413 above :data:`MAX_BODY_BYTES` (declared or sent), 408 when it is not in hand within
    :data:`BODY_TIMEOUT_S` (a client that stalls mid-upload)."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import PlainTextResponse

    too_big = PlainTextResponse(
        f"the request body is larger than {MAX_BODY_BYTES} bytes; send fewer rows per request "
        "(batch_size= of the Spark function, or smaller chat_batch batches)", status_code=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return too_big
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    return too_big
                chunks.append(chunk)
    except TimeoutError:
        return PlainTextResponse(
            f"the request body did not arrive within {BODY_TIMEOUT_S:g} s ({size} bytes came); send the whole "
            "body at once", status_code=408)
    except ClientDisconnect:
        return PlainTextResponse("the client went away before its body arrived", status_code=400)
    return b"".join(chunks)


async def _request_rows(request):
    """The ``params`` column of an Arrow request body as a list (one value per row, None for a null),
    or the error answer: :func:`_read_body`'s, or 400 for a body that is not such an Arrow stream."""
    from starlette.responses import PlainTextResponse

    body = await _read_body(request)
    if not isinstance(body, bytes):
        return body
    try:
        return arrow.decode_params(body).to_pylist()
    except ValueError as exc:
        return PlainTextResponse(str(exc), status_code=400)


def _adapter_dir(path: str, cache_dir: str | None) -> str:
    """An adapter's local directory: ``path`` itself, or a model table's copy on this node when ``path``
    names a model table (``bls.save_model_table(adapter_dir, ...)``)."""
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return path
    from ..model_table import is_model_table, load_model_table

    if is_model_table(path):
        return load_model_table(path, cache_dir=cache_dir)
    if os.path.isdir(path):
        return path  # the backend says what it lacks
    raise ConfigError(f"lora_adapters: {path!r} is neither an adapter directory on this node nor a model table; pass "
                      "the directory bls.job_output(job) gives for bls.sft(..., merge=False), or a model table of it")


def _row_texts(rows: list) -> tuple[list[str], list[int]]:
    """``(texts, their row indexes)`` of an ``embed`` or ``tokenize`` body: each non-null row is the text, or
    request JSON whose ``instruction`` is the text (a JSON row without one is taken as sent)."""
    texts, idx = [], []
    for i, row in enumerate(rows):
        if row is None:
            continue
        text = row
        if row[:1] == "{":
            try:
                text = json.loads(row).get("instruction", row)
            except (ValueError, AttributeError, RecursionError):
                text = row
        texts.append(text if isinstance(text, str) else row)
        idx.append(i)
    return texts, idx


def _json_or_text(value: str) -> Any:
    """A cache header: a JSON object (``CacheSpec.header()``) or plain text (``always``, ``true``)."""
    if value[:1] == "{":
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def _error_item(exc: Exception) -> dict[str, Any]:
    """An error as a handle item; errors that carry an upstream HTTP ``status`` (SaaS) keep their text,
    with the status a caller should see (:func:`~byzerllm_spark.errors.answer_status`: a vendor's 401
    is a 502 here, never a 401 that reads as the caller's own token being wrong)."""
    status = getattr(exc, "status", None)
    if isinstance(exc, RequestRefusedError):  # the caller's 400, with the parameter it names
        return {"error": str(exc), "status": 400, "param": exc.param, "code": exc.code}
    if isinstance(status, int) and 400 <= status < 600:
        return {"error": str(exc), "status": answer_status(status)}
    return {"error": f"{type(exc).__name__}: {exc}", "status": 500}


def _malformed(exc: BaseException) -> str:
    """A malformed request's error text: what kind of input failed, never a huge repr."""
    return f"the request is malformed ({type(exc).__name__}: {str(exc)[:200]}); build it with llm_param(map(...))"


def _subpath(request) -> str:
    """The request's path below the application's route prefix, e.g. ``/arrow``."""
    path = request.url.path.rstrip("/")
    root = request.scope.get("root_path", "").rstrip("/")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return "/" + path.rsplit("/", 1)[-1]


def _tokens(value: Any) -> int:
    try:
        return max(0, int(value))
    except (TypeError, ValueError):
        return 0


def _auth_digest() -> str | None:
    try:
        return stored_digest()
    except Exception:  # not inside Ray (tests building the class directly)
        return None


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"


__all__ = ["ModelWorker", "resolve_model_dir"]
