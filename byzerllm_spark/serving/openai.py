"""The OpenAI-compatible API of a cluster: one Serve application at route prefix ``/v1``.

``POST /v1/chat/completions`` (``stream=true`` as server-sent events), ``POST /v1/completions``,
``POST /v1/embeddings`` and ``GET /v1/models``. The request's ``model`` names the deployment; the
app forwards to its replicas through deployment handles (``chat_batch``, ``stream_chat``,
``embed_rows`` of :class:`~byzerllm_spark.serving.replica.ModelWorker`), so the model's router,
counters and ``stat()`` see these requests like any other. ``deploy()`` starts the app once per
cluster (``ensure_openai_app``).

OpenAI fields map to ``llm_param`` keys: ``messages``, ``temperature``, ``top_p``, ``max_tokens``
(or ``max_completion_tokens``), ``top_k``; ``seed``, ``stop``, ``presence_penalty``,
``frequency_penalty`` and ``logit_bias`` travel as ``generation.<name>``. ``response_format``
(``json_object``, or ``json_schema`` with a schema, OpenAI's shape) is the request's structured output:
the engine constrains its decoding and the worker checks the answer; a malformed one is a 400. A
prompt of ``/v1/completions`` is answered as one user turn. Not supported (400): ``n`` > 1, tools.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
import uuid
from typing import Any

from ..auth import authorized, stored_digest, unauthorized_response
from ..errors import RequestParseError, answer_status, not_deployed
from ..protocol import sse
from ..protocol.request import parse_request
from ..settings import DEPLOYMENT_NAME, OPENAI_APP, OPENAI_ROUTE

logger = logging.getLogger("byzerllm_spark.openai")

INGRESS_NAME = "OpenAIIngress"
#: OpenAI request fields passed to the model as ``generation.<name>``.
PASSTHROUGH = ("seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias")
_IGNORED = {"model", "messages", "prompt", "stream", "stream_options", "n", "user", "temperature", "top_p",
            "max_tokens", "max_completion_tokens", "top_k", "echo", "suffix", "best_of", "logprobs",
            "store", "metadata", "parallel_tool_calls", "service_tier"}


class OpenAIError(Exception):
    """A request the API refuses: answered with OpenAI's error body and ``status``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = {
            401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
        }.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ---- request mapping (pure; unit-tested) ---------------------------------------------------------
def _text_content(content: Any, generation: dict[str, Any]) -> str:
    """OpenAI content: a string, or parts (text joined; the first image URL → generation.image)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise OpenAIError("message content must be a string or a list of content parts", param="messages")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            generation.setdefault("generation.image", url)
        else:
            raise OpenAIError(f"content part type {kind!r} is not supported; use 'text' or 'image_url'", param="messages")
    return "\n".join(texts)


def _common_params(body: dict[str, Any], params: dict[str, Any]) -> None:
    if body.get("tools") or body.get("functions"):
        raise OpenAIError("tools and functions are not supported by this endpoint", param="tools")
    n = body.get("n")
    if n not in (None, 1):
        raise OpenAIError(f"n={n!r} is not supported: ask for one choice per request (n=1)", param="n")
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            params[key] = body[key]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for key in PASSTHROUGH:
        if body.get(key) is not None:
            params[f"generation.{key}"] = body[key]
    if body.get("response_format") is not None:
        params["response_format"] = body["response_format"]


def chat_params(body: dict[str, Any]) -> dict[str, Any]:
    """The ``llm_param`` request for a ``/v1/chat/completions`` body.

    Raises:
        OpenAIError: the body asks for something this API does not do (status 400).
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    params: dict[str, Any] = {}
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise OpenAIError(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role = {"developer": "system"}.get(message["role"], message["role"])
        if role not in ("system", "user", "assistant"):
            raise OpenAIError(f"messages[{i}].role={role!r} is not supported; use system, user or assistant",
                              param="messages")
        turns.append({"role": role, "content": _text_content(message.get("content"), params)})
    params["messages"] = turns
    _common_params(body, params)
    return params


def completion_params(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``llm_param`` request per prompt of a ``/v1/completions`` body."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise OpenAIError("'prompt' must be a string or a list of strings (token arrays are not supported)",
                          param="prompt")
    common: dict[str, Any] = {}
    _common_params(body, common)
    return [{"instruction": p, **common} for p in prompts]


def embedding_inputs(body: dict[str, Any]) -> list[str]:
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise OpenAIError("'input' must be a string or a list of strings (token arrays are not supported)",
                          param="input")
    return texts


def encode_embedding(vector: list[float], encoding_format: str | None) -> Any:
    """``float``: the list; ``base64``: little-endian float32 bytes (what the openai client asks for)."""
    if encoding_format in (None, "float"):
        return vector
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    raise OpenAIError(f"encoding_format={encoding_format!r} is not supported; use 'float' or 'base64'",
                      param="encoding_format")


def _usage(metadata: dict | None) -> dict[str, int]:
    def num(key: str) -> int:
        try:
            return int((metadata or {}).get(key) or 0)
        except (TypeError, ValueError):
            return 0

    prompt, completion = num("prompt_tokens"), num("completion_tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(metadata: dict | None) -> str:
    reason = (metadata or {}).get("finish_reason")
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def _checked(mapping, body: dict[str, Any]):
    """``mapping(body)`` with every request it makes parsed, so malformed values answer 400 before any
    worker is asked; any failure on the client's input (a wrong type, a number too big to convert,
    nesting too deep) is the client's 400, never a 500."""
    try:
        out = mapping(body)
        for params in out if isinstance(out, list) else [out]:
            _with_adapter(params, body)
            parse_request(params)
    except (OpenAIError, RequestParseError):
        raise
    except (TypeError, ValueError, OverflowError, RecursionError, AttributeError) as exc:
        raise OpenAIError(f"the request body is malformed ({type(exc).__name__}: {str(exc)[:200]})") from None
    return out


def _with_adapter(params: dict[str, Any], body: dict[str, Any]) -> None:
    """``model="<deployment>:<adapter>"`` (vLLM's and Ray Serve LLM's name of a LoRA adapter) sets the row's
    ``adapter``; the deployment's workers answer 404 naming the available ones when it has no such adapter."""
    model = body.get("model")
    if isinstance(model, str) and ":" in model:
        params["adapter"] = model.split(":", 1)[1]


def _adapter_models(models: list[str], created: int) -> list[dict[str, Any]]:
    """``GET /v1/models`` entries of the deployments' LoRA adapters: ``<deployment>:<adapter>``, parent the deployment."""
    from .app import lora_adapters

    return [{"id": f"{m}:{name}", "object": "model", "created": created, "owned_by": "byzerllm-spark", "parent": m}
            for m in models for name in sorted(lora_adapters(m))]


def _row_error(row: dict | None) -> OpenAIError:
    meta = (row or {}).get("metadata") or {}
    status = answer_status(meta.get("http_status", 500))  # a vendor's 401 is a 502 here
    return OpenAIError((row or {}).get("error") or "the model returned no answer", status=status)


# ---- the Serve ingress --------------------------------------------------------------------------
class OpenAIIngress:
    """The ``/v1`` application. Stateless apart from cached handles and the model list."""

    def __init__(self) -> None:
        try:
            self._auth = stored_digest()
        except Exception:
            self._auth = None
        self._handles: dict[str, Any] = {}
        self._models: list[str] = []
        self._models_at = 0.0

    async def _deployed(self, refresh: bool = False) -> list[str]:
        if refresh or time.monotonic() - self._models_at > 2.0:
            from .app import deployed_models

            self._models = await asyncio.to_thread(deployed_models)
            self._models_at = time.monotonic()
        return self._models

    async def _handle(self, model: Any):
        if not isinstance(model, str) or not model:
            raise OpenAIError("'model' is required: the name of a deployed model (GET /v1/models lists them)",
                              param="model")
        model = model.split(":", 1)[0]  # "<deployment>:<adapter>" (a LoRA adapter): the deployment's workers answer
        if model not in await self._deployed() and model not in await self._deployed(refresh=True):
            deployed = self._models
            self._handles.pop(model, None)
            raise OpenAIError(
                str(not_deployed(model, deployed)),
                status=404, param="model", code="model_not_found",
            )
        handle = self._handles.get(model)
        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=model)
            self._handles[model] = handle
        return handle

    #: (method, path after ``/v1``) -> handler method name.
    ROUTES = {
        ("POST", "/chat/completions"): "chat",
        ("POST", "/completions"): "completions",
        ("POST", "/embeddings"): "embeddings",
        ("GET", "/models"): "models",
    }

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if self._auth and not authorized(request.headers, self._auth):
            return unauthorized_response(openai_style=True)
        route = self.ROUTES.get((request.method, _subpath(request.url.path)))
        try:
            if route is None:
                served = ", ".join(f"{method} {OPENAI_ROUTE}{path}" for method, path in self.ROUTES)
                raise OpenAIError(f"unknown route {request.method} {request.url.path}; this API serves {served}",
                                  status=404)
            if request.method == "GET":
                return JSONResponse(await getattr(self, route)())
            try:
                body = json.loads(await request.body())
            except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested too deep
                raise OpenAIError(f"the body is not JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
            if not isinstance(body, dict):
                raise OpenAIError("the body must be a JSON object")
            answer = await getattr(self, route)(body)
            return answer if not isinstance(answer, dict) else JSONResponse(answer)
        except OpenAIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        except RequestParseError as exc:
            return JSONResponse(OpenAIError(str(exc)).body(), status_code=400)
        except Exception as exc:  # a replica died mid-request, a model was removed...
            logger.warning("openai request failed: %s: %s", type(exc).__name__, str(exc).splitlines()[0][:300])
            return JSONResponse(OpenAIError(f"{type(exc).__name__}: {str(exc)[:500]}", status=500).body(),
                                status_code=500)

    async def models(self) -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": m, "object": "model", "created": now, "owned_by": "byzerllm-spark"}
                for m in await self._deployed(refresh=True)]
        data += await asyncio.to_thread(_adapter_models, [d["id"] for d in data], now)
        return {"object": "list", "data": data}

    async def chat(self, body: dict[str, Any]):
        from starlette.responses import JSONResponse

        params = _checked(chat_params, body)
        model = body.get("model")
        handle = await self._handle(model)
        if body.get("stream"):
            return await self._stream(handle, model, params, body, chat=True)
        (row,) = await handle.chat_batch.remote([params])
        if not row or row.get("error"):
            raise _row_error(row)
        meta = row.get("metadata") or {}
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": row.get("response") or ""},
                         "logprobs": None, "finish_reason": _finish(meta)}],
            "usage": _usage(meta),
        })

    async def completions(self, body: dict[str, Any]):
        from starlette.responses import JSONResponse

        rows = _checked(completion_params, body)
        model = body.get("model")
        handle = await self._handle(model)
        if body.get("stream"):
            if len(rows) != 1:
                raise OpenAIError("stream=true takes one prompt", param="prompt")
            return await self._stream(handle, model, rows[0], body, chat=False)
        answers = await handle.chat_batch.remote(rows)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for i, row in enumerate(answers):
            if not row or row.get("error"):
                raise _row_error(row)
            meta = row.get("metadata") or {}
            for key, value in _usage(meta).items():
                usage[key] += value
            choices.append({"index": i, "text": row.get("response") or "", "logprobs": None,
                            "finish_reason": _finish(meta)})
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage,
        })

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = embedding_inputs(body)
        encoding = body.get("encoding_format")
        encode_embedding([], encoding)  # refuse an unknown format before the work
        handle = await self._handle(body.get("model"))
        out = await handle.embed_rows.remote(texts)
        if out.get("error"):
            raise OpenAIError(out["error"], status=out.get("status", 500))
        vectors = out["embeddings"]
        dimensions = body.get("dimensions")
        if dimensions is not None and vectors and dimensions != len(vectors[0]):
            raise OpenAIError(f"dimensions={dimensions!r}: this model's vectors have {len(vectors[0])}",
                              param="dimensions")
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": encode_embedding(v, encoding)}
                     for i, v in enumerate(vectors)],
            "model": body.get("model"),
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    async def _stream(self, handle, model: str, params: dict, body: dict, *, chat: bool):
        from starlette.responses import StreamingResponse

        items = handle.options(stream=True).stream_chat.remote(params)
        first = await items.__anext__()  # an error before any text is an HTTP error, not a broken stream
        if "error" in first:
            raise OpenAIError(first["error"], status=first.get("status", 500))
        created = int(time.time())
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(text: str | None, finish: str | None = None, role: bool = False, usage: dict | None = None) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {} if text is None else {"content": text})
                choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                kind = "chat.completion.chunk"
            else:
                choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
                kind = "text_completion"
            data: dict[str, Any] = {"id": ident, "object": kind, "created": created, "model": model,
                                    "choices": [] if usage is not None else choices}
            if usage is not None:
                data["usage"] = usage
            return sse.event(data)

        async def events():
            metadata: dict = {}
            if chat:
                yield chunk(None, role=True)
            item = first
            while True:
                if "text" in item:
                    yield chunk(item["text"])
                elif "metadata" in item:
                    metadata = item["metadata"] or {}
                elif "error" in item:
                    error = OpenAIError(item["error"], status=item.get("status", 500)).body()
                    yield sse.event(error)
                    return
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    break
            yield chunk(None, finish=_finish(metadata))
            if include_usage:
                yield chunk(None, usage=_usage(metadata))
            yield sse.event(sse.DONE)

        return StreamingResponse(events(), media_type=sse.MEDIA_TYPE)


def ensure_openai_app() -> None:
    """Start the ``/v1`` app unless this cluster runs it already (about a second, once)."""
    from ray import serve

    from .app import logging_config

    if OPENAI_APP in serve.status().applications:
        return
    app = (
        serve.deployment(OpenAIIngress)
        .options(name=INGRESS_NAME, num_replicas=1, max_ongoing_requests=1000,
                 ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=5)
        .bind()
    )
    serve.run(app, name=OPENAI_APP, route_prefix=OPENAI_ROUTE, logging_config=logging_config())


def _subpath(path: str) -> str:
    """``/v1/chat/completions`` -> ``/chat/completions``."""
    path = path.rstrip("/")
    return path[len(OPENAI_ROUTE):] if path.startswith(OPENAI_ROUTE + "/") else path


__all__ = ["OPENAI_APP", "OPENAI_ROUTE", "OpenAIIngress", "ensure_openai_app"]
