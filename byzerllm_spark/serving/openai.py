"""The OpenAI-compatible API of a cluster: one Serve application at route prefix ``/v1``.

``POST /v1/chat/completions`` (``stream=true`` as server-sent events), ``POST /v1/completions``,
``POST /v1/responses`` (the Responses API, plain and streamed), ``POST /v1/embeddings``, ``GET /v1/models``
and ``GET /v1/models/{id}``. The request's ``model`` names the deployment; the app forwards to its replicas
through deployment handles (``chat_batch``, ``stream_chat``, ``embed_rows`` of
:class:`~byzerllm_spark.serving.replica.ModelWorker`), so the model's router, counters and ``stat()`` see
these requests like any other. ``deploy()`` starts the app once per cluster (``ensure_openai_app``).

OpenAI fields map to ``llm_param`` keys: ``messages``, ``temperature``, ``top_p``, ``max_tokens`` (or
``max_completion_tokens``), ``top_k``; ``seed``, ``stop``, ``presence_penalty``, ``frequency_penalty``,
``logit_bias``, ``logprobs`` / ``top_logprobs`` and ``tools`` / ``tool_choice`` travel as
``generation.<name>``, and each engine honours them or refuses them (400 naming the parameter, see
:meth:`~byzerllm_spark.backends.base.Backend.check_request`). ``response_format`` (``json_object``, or
``json_schema`` with a schema, OpenAI's shape) is the request's structured output: the engine constrains its
decoding and the worker checks the answer; a malformed one is a 400. ``n`` choices are ``n`` rows of one
batch (with a ``seed``, choice ``i`` uses ``seed + i``). A prompt of ``/v1/completions`` is answered as one
user turn. A null field is a field not set. Fields of OpenAI's API that no engine here serves (audio,
predicted outputs, web search...) are refused with a 400 that names them (:data:`REFUSED`); the rest of
OpenAI's bookkeeping fields (``user``, ``store``, ``metadata``...) are accepted and have no effect. Every
error on the client's side (a bad value, a prompt longer than the model's context) is a 4xx with OpenAI's
error body (``param`` set), so clients do not retry it.
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
#: OpenAI's most choices per request.
MAX_N = 128
#: Fields of OpenAI's API that nothing here serves: a request that sets one (not null, not false, not empty)
#: gets a 400 naming it, with the fix.
REFUSED = {
    "audio": "audio output is not served; ask for text",
    "modalities": "only text is served; leave modalities out or pass [\"text\"]",
    "prediction": "predicted outputs are not served; leave prediction out",
    "web_search_options": "web search is not served; leave web_search_options out",
    "functions": "the deprecated functions field is not served; pass tools",
    "function_call": "the deprecated function_call field is not served; pass tool_choice",
    "reasoning_effort": "the models served here have no reasoning settings; leave reasoning_effort out",
    "echo": "echo is not served; leave it out",
    "suffix": "suffix (insertion) is not served; leave it out",
    "previous_response_id": "responses are not stored here; send the whole conversation as input",
    "conversation": "conversations are not stored here; send the whole conversation as input",
    "background": "background responses are not served; leave background out",
    "prompt": "stored prompt templates are not served; send input",
    "reasoning": "the models served here have no reasoning settings; leave reasoning out",
}


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
def _text_content(content: Any, generation: dict[str, Any], param: str = "messages") -> str:
    """OpenAI content: a string, or parts (text joined; the first image URL → generation.image)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise OpenAIError(f"{param}: message content must be a string or a list of content parts", param=param)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text", "output_text"):
            texts.append(str(part.get("text", "")))
        elif kind in ("image_url", "input_image"):
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            generation.setdefault("generation.image", url)
        else:
            raise OpenAIError(f"content part type {kind!r} is not supported; use 'text' or 'image_url'", param=param)
    return "\n".join(texts)


def _is_set(value: Any) -> bool:
    """OpenAI's "not set": null, and for the refused fields also false and empty."""
    return value not in (None, False, "", [], {})


def _int(body: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise OpenAIError(f"{key}={value!r} is not valid: pass an integer from {lo} to {hi}", param=key)
    return value


def choices_asked(body: dict[str, Any]) -> int:
    """The request's ``n`` (1 when not set).

    Raises:
        OpenAIError: not an integer from 1 to :data:`MAX_N` (400, param ``n``).
    """
    return _int(body, "n", 1, MAX_N, 1)


def _refuse(body: dict[str, Any], keys) -> None:
    for key in keys:
        if key in REFUSED and _is_set(body.get(key)):
            if key == "modalities" and body[key] == ["text"]:
                continue
            raise OpenAIError(f"{key}={_short(body[key])!r} is not supported: {REFUSED[key]}", param=key)


def _short(value: Any) -> Any:
    return value if not isinstance(value, (list, dict)) or len(json.dumps(value)) < 120 else \
        f"<{type(value).__name__} of {len(value)}>"


#: The fields of :data:`REFUSED` each route knows.
CHAT_REFUSED = ("audio", "modalities", "prediction", "web_search_options", "functions", "function_call",
                "reasoning_effort")
COMPLETION_REFUSED = ("echo", "suffix")
RESPONSES_REFUSED = ("previous_response_id", "conversation", "background", "prompt", "reasoning")


def _common_params(body: dict[str, Any], params: dict[str, Any], refused=CHAT_REFUSED) -> None:
    _refuse(body, refused)
    choices_asked(body)
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            params[key] = body[key]
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    for key in PASSTHROUGH:
        if body.get(key) is not None:
            params[f"generation.{key}"] = body[key]
    if body.get("seed") is not None and (isinstance(body["seed"], bool) or not isinstance(body["seed"], int)):
        raise OpenAIError(f"seed={body['seed']!r} is not valid: pass an integer", param="seed")
    if body.get("response_format") is not None:
        params["response_format"] = body["response_format"]
    if _is_set(body.get("tools")) and body.get("tool_choice") != "none":  # the engine renders them or refuses them
        params["generation.tools"] = body["tools"]
        if body.get("tool_choice") is not None:
            params["generation.tool_choice"] = body["tool_choice"]
    elif not _is_set(body.get("tools")) and body.get("tool_choice") not in (None, "none", "auto"):
        raise OpenAIError(f"tool_choice={_short(body['tool_choice'])!r} needs tools: pass tools, or leave "
                          "tool_choice out", param="tool_choice")
    if body.get("stream") and "generation.tools" in params:
        raise OpenAIError("tools with stream=true are not supported: ask without stream to get tool_calls",
                          param="stream")
    if body.get("stream") and body.get("n") not in (None, 1):
        raise OpenAIError(f"n={body['n']!r} with stream=true is not supported: stream one choice, or ask for n "
                          "choices without stream", param="n")


def chat_params(body: dict[str, Any]) -> dict[str, Any]:
    """The ``llm_param`` request for a ``/v1/chat/completions`` body (one choice; see :func:`choices_asked`).

    Raises:
        OpenAIError: the body asks for something this API does not do (status 400, ``param`` set).
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
        if role not in ("system", "user", "assistant") and not (role == "tool" and _is_set(body.get("tools"))):
            raise OpenAIError(f"messages[{i}].role={role!r} is not supported; use system, user or assistant "
                              "(or tool, with tools)", param="messages")
        turns.append({"role": role, "content": _text_content(message.get("content"), params)})
    params["messages"] = turns
    _common_params(body, params)
    top = _int(body, "top_logprobs", 0, 20)
    if body.get("logprobs") is True:
        params["generation.logprobs"] = True
        params["generation.top_logprobs"] = top or 0
    elif body.get("logprobs") not in (None, False):
        raise OpenAIError(f"logprobs={body['logprobs']!r} is not valid: pass true or false", param="logprobs")
    elif top is not None:
        raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
    if body.get("stream") and body.get("logprobs"):
        raise OpenAIError("logprobs with stream=true is not supported: ask for logprobs without stream",
                          param="logprobs")
    return params


def completion_params(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One ``llm_param`` request per prompt of a ``/v1/completions`` body."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise OpenAIError("'prompt' must be a string or a list of strings (token arrays are not supported)",
                          param="prompt")
    common: dict[str, Any] = {}
    _common_params(body, common, COMPLETION_REFUSED)
    if body.get("tools") is not None or body.get("tool_choice") is not None:
        raise OpenAIError("tools are a chat field: send them to /v1/chat/completions", param="tools")
    common.pop("generation.tools", None)
    best_of = body.get("best_of")
    if best_of not in (None, 1) and best_of != body.get("n", 1):
        raise OpenAIError(f"best_of={best_of!r} is not supported: ask for n choices (best_of=n or leave it out)",
                          param="best_of")
    top = _int(body, "logprobs", 0, 5)  # /v1/completions: the number of alternatives per token
    if top is not None:
        if body.get("stream"):
            raise OpenAIError("logprobs with stream=true is not supported: ask for logprobs without stream",
                              param="logprobs")
        common.update({"generation.logprobs": True, "generation.top_logprobs": top})
    return [{"instruction": p, **common} for p in prompts]


def responses_params(body: dict[str, Any]) -> dict[str, Any]:
    """The ``llm_param`` request for a ``/v1/responses`` body (OpenAI's Responses API): ``input`` (a string, or
    a list of messages whose content is a string or ``input_text`` / ``output_text`` parts), ``instructions``
    (the system message), ``max_output_tokens``, ``temperature``, ``top_p``, ``text.format`` (``text``,
    ``json_object`` or ``json_schema`` with ``name`` / ``schema``), and the sampling fields of chat.

    Raises:
        OpenAIError: the body asks for something this API does not do (status 400, ``param`` set): tools,
            stored responses (``previous_response_id``), an input item that is not a message.

    Example:
        >>> responses_params({"input": "hi", "instructions": "Be brief.", "max_output_tokens": 8})["messages"]
        [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'hi'}]
    """
    params: dict[str, Any] = {}
    turns: list[dict[str, str]] = []
    if body.get("instructions") is not None:
        if not isinstance(body["instructions"], str):
            raise OpenAIError("instructions must be a string", param="instructions")
        turns.append({"role": "system", "content": body["instructions"]})
    value = body.get("input")
    if isinstance(value, str):
        turns.append({"role": "user", "content": value})
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            if not isinstance(item, dict) or item.get("type", "message") != "message" or "role" not in item:
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise OpenAIError(f"input[{i}] of type {kind!r} is not supported: pass messages "
                                  "({'role': ..., 'content': ...})", param="input")
            role = {"developer": "system"}.get(item["role"], item["role"])
            if role not in ("system", "user", "assistant"):
                raise OpenAIError(f"input[{i}].role={role!r} is not supported; use system, user or assistant",
                                  param="input")
            turns.append({"role": role, "content": _text_content(item.get("content"), params, "input")})
    else:
        raise OpenAIError("'input' must be a string or a non-empty list of messages", param="input")
    params["messages"] = turns
    if _is_set(body.get("tools")):
        raise OpenAIError("tools are not supported on /v1/responses here; leave tools out", param="tools")
    for key in ("n", "stop", "logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "max_tokens",
                "messages", "response_format"):
        if body.get(key) is not None:  # chat's names: the Responses API has its own or none
            raise OpenAIError(f"{key} is not a field of /v1/responses", param=key)
    if body.get("top_logprobs") not in (None, 0):
        raise OpenAIError("top_logprobs is not supported on /v1/responses; use /v1/chat/completions with logprobs",
                          param="top_logprobs")
    clean = {k: v for k, v in body.items() if k not in ("tools", "tool_choice", "top_logprobs")}
    _common_params(clean, params, RESPONSES_REFUSED)
    if body.get("max_output_tokens") is not None:
        params["max_tokens"] = body["max_output_tokens"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if body.get("text") is not None and not isinstance(body["text"], dict):
        raise OpenAIError("text must be an object like {'format': {'type': 'text'}}", param="text")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise OpenAIError(f"text.format={_short(fmt)!r} is not valid: use type 'text', 'json_object' or "
                              "'json_schema' (with name and schema)", param="text.format")
        if fmt["type"] == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise OpenAIError("text.format of type json_schema needs a 'schema' object (and a 'name')",
                                  param="text.format")
            params["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name") or "answer", "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
        elif fmt["type"] == "json_object":
            params["response_format"] = {"type": "json_object"}
    return params


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


async def _check_adapter(name: str, model: str) -> None:
    """404 ``model_not_found`` (as OpenAI answers an unknown model) when deployment ``model`` has no such adapter."""
    from .app import lora_adapters

    adapter = name.split(":", 1)[1]
    known = await asyncio.to_thread(lora_adapters, model)
    if adapter not in known:
        raise OpenAIError(f"model {name!r} is not served: deployment {model!r} has no LoRA adapter {adapter!r}; "
                          f"available: {', '.join(sorted(known)) or 'none'} (GET /v1/models lists them)",
                          status=404, param="model", code="model_not_found")


def _adapter_models(models: list[str], created: int) -> list[dict[str, Any]]:
    """``GET /v1/models`` entries of the deployments' LoRA adapters: ``<deployment>:<adapter>``, parent the deployment."""
    from .app import lora_adapters

    return [{"id": f"{m}:{name}", "object": "model", "created": created, "owned_by": "byzerllm-spark", "parent": m}
            for m in models for name in sorted(lora_adapters(m))]


def _row_error(row: dict | None) -> OpenAIError:
    meta = (row or {}).get("metadata") or {}
    status = answer_status(meta.get("http_status", 500))  # a vendor's 401 is a 502 here
    return OpenAIError((row or {}).get("error") or "the model returned no answer", status=status,
                       param=meta.get("param"), code=meta.get("code"))


def _item_error(item: dict) -> OpenAIError:
    """A stream's error item (``{"error", "status", "param"?, "code"?}``) as the API's error."""
    return OpenAIError(item["error"], status=item.get("status", 500), param=item.get("param"), code=item.get("code"))


def _json_meta(meta: dict, key: str) -> Any:
    """A row metadata value the engine sent as JSON text (``logprobs``, ``tool_calls``), or None."""
    value = meta.get(key)
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


def completion_logprobs(content: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """Chat-style ``logprobs.content`` as ``/v1/completions`` gives it (``tokens``, ``token_logprobs``,
    ``top_logprobs`` as ``{token: logprob}``, ``text_offset``)."""
    if content is None:
        return None
    offsets, at = [], 0
    for item in content:
        offsets.append(at)
        at += len(item["token"])
    return {
        "tokens": [item["token"] for item in content],
        "token_logprobs": [item["logprob"] for item in content],
        "top_logprobs": [{alt["token"]: alt["logprob"] for alt in item.get("top_logprobs") or []} for item in content],
        "text_offset": offsets,
    }


def _seeded(params: dict[str, Any], i: int) -> dict[str, Any]:
    """Choice ``i`` of ``n``: with a ``seed``, its own (``seed + i``), so the choices differ and each repeats."""
    seed = params.get("generation.seed")
    if i == 0 or seed is None:
        return params
    return {**params, "generation.seed": int(seed) + i}


def _usage_of(rows: list[dict], prompts: int = 1) -> dict[str, int]:
    """The usage of ``rows`` (n choices of ``prompts`` prompts): each prompt counted once."""
    per = [_usage(r.get("metadata")) for r in rows]
    n = max(1, len(rows) // max(1, prompts))
    prompt = sum(u["prompt_tokens"] for u in per[::n])
    completion = sum(u["completion_tokens"] for u in per)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
        name, model = model, model.split(":", 1)[0]  # "<deployment>:<adapter>": the deployment's workers answer
        if model not in await self._deployed() and model not in await self._deployed(refresh=True):
            deployed = self._models
            self._handles.pop(model, None)
            raise OpenAIError(
                str(not_deployed(model, deployed)),
                status=404, param="model", code="model_not_found",
            )
        if name != model:
            await _check_adapter(name, model)
        handle = self._handles.get(model)
        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=model)
            self._handles[model] = handle
        return handle

    #: (method, path after ``/v1``) -> handler method name; ``/models/{id}`` is matched by prefix.
    ROUTES = {
        ("POST", "/chat/completions"): "chat",
        ("POST", "/completions"): "completions",
        ("POST", "/responses"): "responses",
        ("POST", "/embeddings"): "embeddings",
        ("GET", "/models"): "models",
        ("GET", "/models/{id}"): "model",
    }

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if self._auth and not authorized(request.headers, self._auth):
            return unauthorized_response(openai_style=True)
        path = _subpath(request.url.path)
        route = self.ROUTES.get((request.method, path))
        if route is None and request.method == "GET" and path.startswith("/models/"):
            route = "model"
        try:
            if route is None:
                served = ", ".join(f"{method} {OPENAI_ROUTE}{path}" for method, path in self.ROUTES)
                raise OpenAIError(f"unknown route {request.method} {request.url.path}; this API serves {served}",
                                  status=404)
            if route == "model":
                return JSONResponse(await self.model(path[len("/models/"):]))
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
            return JSONResponse(OpenAIError(str(exc), param=_param_of(str(exc))).body(), status_code=400)
        except Exception as exc:  # a replica died mid-request, a model was removed...
            logger.warning("openai request failed: %s: %s", type(exc).__name__, str(exc).splitlines()[0][:300])
            return JSONResponse(OpenAIError(f"{type(exc).__name__}: {str(exc)[:500]}", status=500).body(),
                                status_code=500)

    async def models(self) -> dict[str, Any]:
        now = int(time.time())
        data = [_model_object(m, now) for m in await self._deployed(refresh=True)]
        data += await asyncio.to_thread(_adapter_models, [d["id"] for d in data], now)
        return {"object": "list", "data": data}

    async def model(self, model: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``: the deployed model, or 404 (``model_not_found``)."""
        from urllib.parse import unquote

        await self._handle(unquote(model))
        return _model_object(unquote(model), int(time.time()))

    async def _rows(self, handle, rows: list[dict]) -> list[dict]:
        """The answers of ``rows`` (one batch to one worker); the first failed row's error is the request's."""
        answers = await handle.chat_batch.remote(rows)
        for row in answers:
            if not row or row.get("error"):
                raise _row_error(row)
        return answers

    async def chat(self, body: dict[str, Any]):
        from starlette.responses import JSONResponse

        params = _checked(chat_params, body)
        n = choices_asked(body)
        model = body.get("model")
        handle = await self._handle(model)
        if body.get("stream"):
            return await self._stream(handle, model, params, body, chat=True)
        rows = await self._rows(handle, [_seeded(params, i) for i in range(n)])
        choices = []
        for i, row in enumerate(rows):
            meta = row.get("metadata") or {}
            message: dict[str, Any] = {"role": "assistant", "content": row.get("response") or ""}
            finish = _finish(meta)
            tool_calls = _json_meta(meta, "tool_calls")
            if tool_calls:
                message["tool_calls"] = tool_calls
                finish = "tool_calls"
            logprobs = _json_meta(meta, "logprobs")
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}})
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": _usage_of(rows),
        })

    async def completions(self, body: dict[str, Any]):
        from starlette.responses import JSONResponse

        prompts = _checked(completion_params, body)
        n = choices_asked(body)
        model = body.get("model")
        handle = await self._handle(model)
        if body.get("stream"):
            if len(prompts) != 1:
                raise OpenAIError("stream=true takes one prompt", param="prompt")
            return await self._stream(handle, model, prompts[0], body, chat=False)
        # Choice k * n + j is prompt k's choice j, as OpenAI orders them.
        rows = await self._rows(handle, [_seeded(p, j) for p in prompts for j in range(n)])
        choices = []
        for i, row in enumerate(rows):
            meta = row.get("metadata") or {}
            choices.append({"index": i, "text": row.get("response") or "", "finish_reason": _finish(meta),
                            "logprobs": completion_logprobs(_json_meta(meta, "logprobs"))})
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": _usage_of(rows, len(prompts)),
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
            raise _item_error(first)
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
                    yield sse.event(_item_error(item).body())
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

    # ---- the Responses API ------------------------------------------------------------------------
    async def responses(self, body: dict[str, Any]):
        """``POST /v1/responses``: one answer as a Response object, or (``stream=true``) its typed events
        ``response.created``, ``response.in_progress``, ``response.output_item.added``,
        ``response.content_part.added``, ``response.output_text.delta``..., ``response.output_text.done``,
        ``response.content_part.done``, ``response.output_item.done``, ``response.completed``."""
        from starlette.responses import JSONResponse, StreamingResponse

        params = _checked(responses_params, body)
        model = body.get("model")
        handle = await self._handle(model)
        ident, item_id, created = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}", int(time.time())
        if not body.get("stream"):
            (row,) = await self._rows(handle, [params])
            return JSONResponse(_response_object(ident, item_id, created, model, body, row.get("response") or "",
                                                 row.get("metadata") or {}))
        items = handle.options(stream=True).stream_chat.remote(params)
        first = await items.__anext__()
        if "error" in first:
            raise _item_error(first)

        async def events():
            seq = 0

            def event(kind: str, **fields) -> str:
                nonlocal seq
                seq += 1
                return sse.named_event(kind, {"type": kind, "sequence_number": seq - 1, **fields})

            at = dict(item_id=item_id, output_index=0, content_index=0)
            pending = _response_object(ident, item_id, created, model, body, None, {})
            yield event("response.created", response=pending)
            yield event("response.in_progress", response=pending)
            yield event("response.output_item.added", output_index=0, item=_message_item(item_id, None))
            yield event("response.content_part.added", part=_text_part(""), **at)
            texts, metadata, item = [], {}, first
            while True:
                if "text" in item:
                    texts.append(item["text"])
                    yield event("response.output_text.delta", delta=item["text"], logprobs=[], **at)
                elif "metadata" in item:
                    metadata = item["metadata"] or {}
                elif "error" in item:
                    error = _item_error(item)
                    yield event("error", code=error.code, message=str(error), param=error.param)
                    return
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    break
            text = "".join(texts)
            yield event("response.output_text.done", text=text, logprobs=[], **at)
            yield event("response.content_part.done", part=_text_part(text), **at)
            done = _response_object(ident, item_id, created, model, body, text, metadata)
            yield event("response.output_item.done", output_index=0, item=done["output"][0])
            yield event("response.completed" if done["status"] == "completed" else "response.incomplete",
                        response=done)

        return StreamingResponse(events(), media_type=sse.MEDIA_TYPE)


def _model_object(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "byzerllm-spark"}


def _param_of(message: str) -> str | None:
    """The request field a parse error names (``temperature=5 is not valid...``), or None."""
    head = message.split("=", 1)[0].split(" ", 1)[0].strip("'")
    return head if head and head.replace("_", "").replace(".", "").isalnum() else None


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None) -> dict[str, Any]:
    """The Response's one output item: the assistant's message (in progress while ``text`` is None)."""
    return {"type": "message", "id": item_id, "role": "assistant",
            "status": "in_progress" if text is None else "completed",
            "content": [] if text is None else [_text_part(text)]}


def _response_object(ident: str, item_id: str, created: int, model: str, body: dict, text: str | None,
                     metadata: dict) -> dict[str, Any]:
    """A Response object (``object: "response"``): in progress while ``text`` is None, else completed (or
    ``incomplete`` when cut at ``max_output_tokens``)."""
    usage = _usage(metadata)
    cut = text is not None and _finish(metadata) == "length"
    status = "in_progress" if text is None else ("incomplete" if cut else "completed")
    fmt = (body.get("text") or {}).get("format") or {"type": "text"}
    return {
        "id": ident, "object": "response", "created_at": created, "status": status, "model": model,
        "output": [] if text is None else [_message_item(item_id, text)],
        "error": None, "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"), "top_p": body.get("top_p"),
        "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "text": {"format": fmt},
        "metadata": body.get("metadata") or {}, "store": False, "truncation": "disabled",
        "usage": None if text is None else {
            "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}},
    }


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
