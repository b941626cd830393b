"""Byzer-LLM's model plugin contract, unchanged (its docs: "adding a new model type").

A plugin is a module with ``init_model(model_dir, infer_params, sys_conf) -> (model, tokenizer)``
that binds ``stream_chat(self, tokenizer, ins, his, max_length, top_p, temperature, **kwargs)`` to
the model. As in Byzer-LLM, ``model_dir`` is the model directory the deployment names
(``model_path`` / ``localModelDir``, or a materialised model table), None when it names none;
``infer_params`` is the deployment's whole string map; ``sys_conf`` is its ``sys_conf``. Byzer-LLM plugins return ``[(text, meta)]``; this adapter also accepts a plain string,
``(text, meta)``, or a generator of text pieces (streamed).

A request with a ``response_format`` reaches ``stream_chat`` with ``response_format`` (OpenAI's shape)
and ``json_schema`` (the schema) keyword arguments; whatever the plugin answers is checked against the
schema by the worker, so a plugin that cannot constrain its output still never returns a wrong value.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, AsyncIterator

from ..errors import ConfigError
from .base import Backend, ChatResult, stop_event, stop_requested


def _split_result(result: Any) -> tuple[str, dict[str, str]]:
    """Normalise what ``stream_chat`` returned into (text, metadata)."""
    # Byzer-LLM's shape, ``[(text, {"metadata": {str: str}})]``, once per row: checked first.
    if type(result) is list and len(result) == 1 and type(result[0]) is tuple and len(result[0]) == 2:
        text, meta = result[0]
        if type(text) is str and type(meta) is dict:
            inner = meta.get("metadata", meta)
            if type(inner) is dict:  # non-string keys or values are made strings when encoded
                return text, dict(inner)
    meta: Any = {}
    if isinstance(result, list) and len(result) == 1:
        result = result[0]
    if isinstance(result, tuple) and len(result) == 2:
        result, meta = result
    if isinstance(result, (list, tuple)) or inspect.isgenerator(result):
        result = "".join(str(piece) for piece in result)
    if isinstance(meta, dict) and isinstance(meta.get("metadata"), dict):
        meta = meta["metadata"]
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    return ("" if result is None else str(result)), metadata


class PluginBackend(Backend):
    """Runs a user module written to Byzer-LLM's plugin contract."""

    name = "plugin"
    preferred_batch_size = 64

    def __init__(self, config, model_dir, module) -> None:
        super().__init__(config, model_dir)
        self.module = module
        self.name = f"plugin:{module.__name__}"
        infer_params = {k: v for k, v in config.infer_params.raw.items()}
        self.model, self.tokenizer = module.init_model(model_dir, infer_params, dict(config.sys_conf))
        if not callable(getattr(self.model, "stream_chat", None)):
            raise ConfigError(
                f"plugin {module.__name__!r}: init_model returned a model without stream_chat; bind it with "
                "model.stream_chat = types.MethodType(stream_chat, model), as Byzer-LLM's plugin contract says"
            )
        # One call at a time per worker unless the user raised worker_concurrency: plugins are
        # written for a single caller, as in Byzer-LLM.
        self._lock = asyncio.Lock() if config.worker_concurrency == 1 else None
        self.preferred_batch_size = int(getattr(module, "PREFERRED_BATCH_SIZE", self.preferred_batch_size))
        context = getattr(module, "CONTEXT_LENGTH", None)  # optional: a plugin may declare its context
        self.context_length = int(context) if context else None
        if hasattr(module, "embed") or hasattr(self.model, "embed_query"):
            self.supports_embedding = True

    def _kwargs(self, request) -> dict[str, Any]:
        if not request.generation and request.system_msg is None and request.user_role is None and (
            request.assistant_role is None and request.top_k is None and request.response_format is None
        ):
            return {}
        kwargs: dict[str, Any] = dict(request.generation)
        for key in ("system_msg", "user_role", "assistant_role", "top_k"):
            value = getattr(request, key)
            if value is not None:
                kwargs[key] = value
        if request.response_format is not None:  # a plugin that can constrain uses them; its answer is checked
            kwargs["response_format"] = request.response_format.openai()
            kwargs["json_schema"] = request.response_format.schema
        return kwargs

    def _run_rows(self, requests) -> list[ChatResult]:
        out = []
        stream_chat = self.model.stream_chat
        tokenizer = self.tokenizer
        stop = stop_event()
        for req in requests:
            if stop.is_set():  # the caller went away: the rest of the batch is not worked on
                out.append(ChatResult(error="cancelled: the caller went away"))
                continue
            try:
                text, meta = _split_result(
                    stream_chat(
                        tokenizer,
                        req.instruction,
                        list(req.history),
                        max_length=req.max_length,
                        top_p=req.top_p,
                        temperature=req.temperature,
                        **self._kwargs(req),
                    )
                )
                out.append(ChatResult(response=text, metadata=meta))
            except Exception as exc:  # a failing row must not fail its batch
                out.append(ChatResult(error=f"{type(exc).__name__}: {exc}"))
        return out

    async def chat_batch(self, requests) -> list[ChatResult]:
        if self._lock is None:
            return await asyncio.to_thread(self._run_rows, requests)
        async with self._lock:
            return await asyncio.to_thread(self._run_rows, requests)

    async def stream_chat(self, request) -> AsyncIterator[Any]:
        # The plugin is synchronous: call it (and step its generator) in a thread, under the
        # worker's lock like chat_batch, so a slow plugin never blocks the replica's event loop.
        call = functools.partial(
            self.model.stream_chat,
            self.tokenizer,
            request.instruction,
            list(request.history),
            max_length=request.max_length,
            top_p=request.top_p,
            temperature=request.temperature,
            **self._kwargs(request),
        )
        if self._lock is not None:
            await self._lock.acquire()
        try:
            result = await asyncio.to_thread(call)
            if inspect.isgenerator(result):
                done = object()
                while not stop_requested():
                    piece = await asyncio.to_thread(next, result, done)
                    if piece is done:
                        break
                    yield str(piece)
            else:
                text, meta = _split_result(result)
                yield text
                yield ChatResult(metadata=meta)
        finally:
            if self._lock is not None:
                self._lock.release()

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """The module's ``count_tokens(model, tokenizer, texts)`` if it has one, else a Hugging Face style
        tokenizer returned by ``init_model``."""
        fn = getattr(self.module, "count_tokens", None)
        if fn is not None:
            return [int(n) for n in await asyncio.to_thread(fn, self.model, self.tokenizer, list(texts))]
        if callable(self.tokenizer) and hasattr(self.tokenizer, "encode"):
            from .transformers_backend import TokenCounter

            if getattr(self, "_counter", None) is None:
                self._counter = TokenCounter(self.tokenizer)
            return await asyncio.to_thread(self._counter, texts)
        raise NotImplementedError(
            f"{self.name} has no tokenizer to count with: its init_model returned none, and the module has no "
            "count_tokens(model, tokenizer, texts); add one, or count with a transformers or llama_cpp model")

    async def embed_batch(self, texts):
        fn = getattr(self.module, "embed", None)
        if fn is not None:
            return await asyncio.to_thread(fn, self.model, self.tokenizer, texts)
        return await asyncio.to_thread(lambda: [self.model.embed_query(t) for t in texts])

