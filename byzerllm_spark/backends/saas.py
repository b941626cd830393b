"""SaaS backends: ``saas/<vendor>`` calls an OpenAI-compatible HTTP API (Byzer-LLM's ``byzerllm deploy
--pretrained_model_type saas/<vendor>``).

Every vendor that Byzer-LLM knows by name and that offers an OpenAI-compatible API maps to its
base URL (:data:`VENDORS`); ``saas/openai`` and ``saas/official_openai`` take any such server
through ``saas.base_url`` (ollama, vLLM, another byzerllm-spark endpoint's ``/v1``).

``infer_params`` keys (all ``saas.``-prefixed, see :data:`SAAS_KEYS`): ``api_key``, ``model``,
``base_url``, ``qps`` (upstream requests per second per worker), ``max_retries``, ``timeout``,
``backoff``, ``max_backoff``, ``embedding``, ``headers``. Any ``generation.<name>`` key of a request
goes into the upstream request body as ``<name>`` (``generation.seed``, ``generation.stop``...). A
request's ``response_format`` goes upstream in OpenAI's shape; the worker checks the answer against it.

Each worker sends at most ``worker_concurrency`` upstream requests at once (one by default, as in
Byzer-LLM: a SaaS worker takes one request at a time), spaced by ``saas.qps``. 408, 429 and 5xx
answers and connection errors are retried with exponential backoff and jitter, honouring
``Retry-After`` / ``retry-after-ms``; a row that still fails gets its error and the batch goes on.
Token usage comes back in each row's metadata (``prompt_tokens``, ``completion_tokens``).

The API key is sent only in the ``Authorization`` header; every message this module produces is
scrubbed of it (an upstream error body that quotes the key included).

HTTP goes through aiohttp (a dependency of ``ray[default]``), imported when a worker builds the
backend, so the vendor table and option parsing stay light for the driver.

Why not the ``openai`` package's async client, which retries, honours ``Retry-After`` and parses SSE
itself: measured here (2026-11-29, openai 3.57), it loses throughput and needs its private methods.
In-process (400 requests, 4 in flight, ``tests/_fake_openai.py``) it spends 1.2-1.5 ms of CPU per
request (its request-params transform and response construction) against 0.2-0.4 ms here, and
with its default httpx2 transport each request waits about 40 ms more (41-45 req/s against a 50 ms
upstream, 59-64 with its aiohttp transport). ``benchmarks/bench_saas.py``, run in turn with each
implementation on 2 cores shared with other jobs: ``client`` 61.2 / 64.6 / 65.6 req/s with the
``openai`` client against 63.5 / 69.4 / 69.7 with this module, ``openai`` 54.6 / 58.9 / 55.6 against
56.3 / 60.6 / 55.5. Keeping ``saas.backoff`` / ``saas.max_backoff``, and a ``saas.qps`` that spaces
retries too, also meant overriding its private ``_calculate_retry_timeout`` and ``_prepare_request``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Mapping

from ..config import REDACTED, parse_typed
from ..errors import BackendNotFoundError, ConfigError, SaasError, bad_value
from .base import Backend, ChatResult, row_answered

if TYPE_CHECKING:
    from ..config import DeployConfig

#: ``saas/<vendor>`` → OpenAI-compatible base URL; None: the vendor needs ``saas.base_url``.
VENDORS: dict[str, str | None] = {
    "openai": "https://api.openai.com/v1",
    "official_openai": "https://api.openai.com/v1",
    "azure_openai": None,  # per-resource URL: https://<resource>.openai.azure.com/openai/v1
    "qianwen": "https://dashscope.aliyuncs.com/compatible-mode/v1",
    "qianwen_vl": "https://dashscope.aliyuncs.com/compatible-mode/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "zhipu": "https://open.bigmodel.cn/api/paas/v4",
    "chatglm": "https://open.bigmodel.cn/api/paas/v4",
    "moonshot": "https://api.moonshot.cn/v1",
    "kimi": "https://api.moonshot.cn/v1",
    "siliconflow": "https://api.siliconflow.cn/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "baichuan": "https://api.baichuan-ai.com/v1",
    "minimax": "https://api.minimax.chat/v1",
    "volcengine": "https://ark.cn-beijing.volces.com/api/v3",
    "qianfan": "https://qianfan.baidubce.com/v2",
    "sparkdesk": "https://spark-api-open.xf-yun.com/v1",
    "yi": "https://api.lingyiwanwu.com/v1",
    "claude": "https://api.anthropic.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
}

#: Accepted ``saas.<key>`` names and what they take.
SAAS_KEYS: dict[str, str] = {
    "api_key": "the vendor's API key, sent as 'Authorization: Bearer <key>' (optional for local servers)",
    "model": "the vendor's model name, e.g. 'moonshot-v1-32k' (required)",
    "base_url": "the OpenAI-compatible base URL ending in /v1 (default: the vendor's)",
    "qps": "upstream requests per second per worker, e.g. '5' (default 0: unlimited)",
    "max_retries": "retries of 408/429/5xx answers and connection errors (default 5)",
    "timeout": "seconds per upstream request (default 120)",
    "backoff": "first retry delay in seconds, doubled each retry (default 0.5)",
    "max_backoff": "longest delay between retries, Retry-After included (default 30)",
    "embedding": "'true' makes this an embedding deployment (POST /embeddings upstream)",
    "headers": "extra HTTP headers as a JSON object, e.g. '{\"api-key\": \"...\"}'",
}
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def known_vendors() -> list[str]:
    return sorted(VENDORS)


@dataclass(frozen=True)
class SaasOptions:
    """The ``saas.*`` keys of one deployment, parsed and checked. The key never shows in its repr."""

    vendor: str
    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    qps: float = 0.0
    max_retries: int = 5
    timeout: float = 120.0
    backoff: float = 0.5
    max_backoff: float = 30.0
    embedding: bool = False
    headers: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, config: "DeployConfig") -> "SaasOptions":
        """Parse ``config.infer_params.saas``.

        Raises:
            BackendNotFoundError: the vendor is unknown (lists the known ones).
            ConfigError: a key is unknown or a value malformed (secret values are not echoed).
        """
        vendor = config.pretrained_model_type.split("/", 1)[1]
        if vendor not in VENDORS:
            raise BackendNotFoundError(
                f"pretrained_model_type={config.pretrained_model_type!r}: unknown SaaS vendor {vendor!r}; known: "
                f"{', '.join('saas/' + v for v in known_vendors())}. Any OpenAI-compatible server works as "
                "saas/openai with saas.base_url=..."
            )
        given = dict(config.infer_params.saas)
        unknown = sorted(set(given) - set(SAAS_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown infer_params key 'saas.{unknown[0]}': accepted saas keys are "
                f"{', '.join('saas.' + k for k in SAAS_KEYS)}"
            )
        base_url = given.get("base_url") or VENDORS[vendor]
        if not base_url:
            raise ConfigError(
                f"pretrained_model_type='saas/{vendor}' has no public default URL: pass "
                "infer_params saas.base_url=<its OpenAI-compatible URL ending in /v1>"
            )
        base_url = str(base_url).strip().rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(
                bad_value("saas.base_url", base_url, "use an http(s) URL such as 'https://api.moonshot.cn/v1'")
            )
        model = given.get("model")
        if not model or not isinstance(model, str):
            raise ConfigError(
                "infer_params needs saas.model: the vendor's model name, e.g. saas.model=moonshot-v1-32k "
                "(for another byzerllm-spark endpoint: the deployed model's name)"
            )
        api_key = given.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise ConfigError(f"saas.api_key={REDACTED} is not valid: pass the key as a string")
        if config.gpus_per_worker:
            raise ConfigError(
                bad_value("gpus_per_worker", config.gpus_per_worker, "SaaS workers call a remote API; use 0, as Byzer-LLM's deploy docs say")
            )

        def typed(key: str, kind: str, default: Any, minimum: float | None = None) -> Any:
            if given.get(key) in (None, ""):
                return default
            value = parse_typed(f"saas.{key}", kind, given[key])
            if minimum is not None and value < minimum:
                raise ConfigError(bad_value(f"saas.{key}", given[key], f"use a number >= {minimum:g}"))
            return value

        try:
            headers = typed("headers", "dict", {})
        except ConfigError:
            raise ConfigError("saas.headers is not valid: pass a JSON object of header names to strings") from None
        return cls(
            vendor=vendor,
            base_url=base_url,
            model=model,
            api_key=api_key or None,
            qps=typed("qps", "float", 0.0, 0.0),
            max_retries=typed("max_retries", "int", 5, 0),
            timeout=typed("timeout", "float", 120.0, 0.001),
            backoff=typed("backoff", "float", 0.5, 0.0),
            max_backoff=typed("max_backoff", "float", 30.0, 0.0),
            embedding=typed("embedding", "bool", False),
            headers={str(k): str(v) for k, v in headers.items()},
        )

    def secrets(self) -> list[str]:
        values = [self.api_key] if self.api_key else []
        values += [v for v in self.headers.values() if len(v) >= 8]
        return values


def check_config(config: "DeployConfig") -> str:
    """Driver-side check of a ``saas/<vendor>`` deployment (imports nothing heavy)."""
    SaasOptions.from_config(config)
    config.infer_params.check_keys(config.pretrained_model_type, saas=True)
    return config.pretrained_model_type


class RateLimiter:
    """Spaces calls ``1/qps`` seconds apart in one event loop (no bursts); qps 0: no limit."""

    def __init__(self, qps: float) -> None:
        self.interval = 1.0 / qps if qps > 0 else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds asked by ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), else None."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


class SaasBackend(Backend):
    """An OpenAI-compatible vendor, called over HTTP from each worker."""

    name = "saas"
    # Rows per Spark request: each row is one upstream call, so small batches spread over workers.
    preferred_batch_size = 8

    def __init__(self, config: "DeployConfig", model_dir: str | None) -> None:
        super().__init__(config, model_dir)
        self.options = SaasOptions.from_config(config)
        self.name = f"saas/{self.options.vendor}"
        self.supports_embedding = self.options.embedding
        self._secrets = self.options.secrets()
        self._headers = {"Content-Type": "application/json", **self.options.headers}
        if self.options.api_key:
            self._headers["Authorization"] = f"Bearer {self.options.api_key}"
        self._limiter = RateLimiter(self.options.qps)
        self._concurrency = max(1, int(config.worker_concurrency))
        self._slots: asyncio.Semaphore | None = None
        self._session = None

    # ---- plumbing -------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def _http(self):
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._concurrency * 2 + 4)
            self._session = aiohttp.ClientSession(connector=connector)
            self._slots = asyncio.Semaphore(self._concurrency)
        return self._session

    def _describe(self, what: str) -> str:
        return f"{self.name} model {self.options.model!r} at {self.options.base_url}: {what}"

    async def _send(self, path: str, body: dict, *, stream: bool = False):
        """POST ``body`` to ``base_url + path``; retry what is transient. Returns (response, retries).

        The response is open: the caller reads it and releases it.
        """
        import aiohttp

        session = self._http()
        url = self.options.base_url + path
        if stream:
            timeout = aiohttp.ClientTimeout(total=None, connect=self.options.timeout, sock_read=self.options.timeout)
        else:
            timeout = aiohttp.ClientTimeout(total=self.options.timeout)
        retries = 0
        while True:
            await self._limiter.wait()
            retry_after = None
            try:
                resp = await session.post(url, json=body, headers=self._headers, timeout=timeout)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status, error = None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if resp.status == 200:
                    return resp, retries
                status = resp.status
                try:
                    text = (await resp.text())[:500]
                except Exception:  # a broken body must not hide the status
                    text = ""
                retry_after = retry_after_seconds(resp.headers)
                resp.release()
                error = f"HTTP {status}: {text}"
                if status not in RETRY_STATUS:
                    hint = " (check saas.api_key)" if status in (401, 403) else ""
                    raise SaasError(self.scrub(self._describe(error + hint)), status, retries)
            if retries >= self.options.max_retries:
                hint = f"{error} (after {retries} retries; raise saas.max_retries or lower saas.qps)"
                raise SaasError(self.scrub(self._describe(hint)), status or 502, retries)
            retries += 1
            delay = min(self.options.backoff * 2 ** (retries - 1), self.options.max_backoff)
            delay *= 0.5 + random.random() / 2  # jitter: workers hit by the same 429 do not retry in step
            if retry_after is not None:
                delay = min(max(delay, retry_after), self.options.max_backoff)
            await asyncio.sleep(delay)

    async def _post_json(self, path: str, body: dict) -> tuple[dict, int]:
        resp, retries = await self._send(path, body)
        try:
            data = await resp.json(content_type=None)
        except Exception as exc:  # aiohttp's ContentTypeError, JSONDecodeError...
            what = f"the answer is not JSON ({type(exc).__name__})"
            raise SaasError(self.scrub(self._describe(what)), 502, retries) from None
        finally:
            resp.release()
        if not isinstance(data, dict):
            raise SaasError(self._describe("the answer is not a JSON object"), 502, retries)
        return data, retries

    # ---- chat -----------------------------------------------------------------------------
    def chat_body(self, req) -> dict[str, Any]:
        """The upstream request for one :class:`~byzerllm_spark.protocol.request.ChatRequest`."""
        body: dict[str, Any] = {"model": self.options.model, "messages": req.messages(), **req.sampling()}
        for key, value in req.generation.items():
            if key not in ("model", "messages", "stream"):
                body[key] = value
        if req.response_format is not None:  # the vendor constrains; the worker checks the answer
            body["response_format"] = req.response_format.openai()
        return body

    async def _chat_one(self, req) -> ChatResult:
        self._http()
        assert self._slots is not None
        async with self._slots:
            try:
                data, retries = await self._post_json("/chat/completions", self.chat_body(req))
            except SaasError as exc:
                return ChatResult(error=str(exc), metadata=exc.metadata())
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
            text = message.get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            snippet = self.scrub(json.dumps(data)[:300])
            return ChatResult(error=self._describe(f"unexpected answer {snippet}"), metadata={"retries": str(retries)})
        usage = data.get("usage") or {}
        meta = {
            "prompt_tokens": str(_int(usage.get("prompt_tokens"))),
            "completion_tokens": str(_int(usage.get("completion_tokens"))),
            "finish_reason": str(choice.get("finish_reason") or "stop"),
            "model": str(data.get("model") or self.options.model),
            "retries": str(retries),
        }
        if message.get("reasoning_content"):
            meta["reasoning_content"] = str(message["reasoning_content"])
        # What /v1 passes back as it came (the request's logprobs / tools went upstream as generation.*).
        if isinstance(choice.get("logprobs"), dict) and choice["logprobs"].get("content") is not None:
            meta["logprobs"] = json.dumps(choice["logprobs"]["content"], ensure_ascii=False)
        if message.get("tool_calls"):
            meta["tool_calls"] = json.dumps(message["tool_calls"], ensure_ascii=False)
        return ChatResult(response=str(text), metadata=meta)

    async def chat_batch(self, requests) -> list[ChatResult]:
        async def one(i: int, req) -> ChatResult:
            result = await self._chat_one(req)
            row_answered(i, result)  # the worker's response cache keeps it now, whatever the other rows do
            return result

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    async def stream_chat(self, request) -> AsyncIterator[Any]:
        """Yield text pieces as the vendor sends them, then a ChatResult with the usage metadata."""
        body = self.chat_body(request)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        self._http()
        assert self._slots is not None
        usage: dict = {}
        finish = "stop"
        async with self._slots:
            resp, retries = await self._send("/chat/completions", body, stream=True)
            try:
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(data)
                    except json.JSONDecodeError:
                        continue
                    if chunk.get("error"):
                        what = f"stream error {json.dumps(chunk['error'])[:300]}"
                        raise SaasError(self.scrub(self._describe(what)), 502, retries)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            yield piece
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
            finally:
                resp.release()
        yield ChatResult(
            metadata={
                "prompt_tokens": str(_int(usage.get("prompt_tokens"))),
                "completion_tokens": str(_int(usage.get("completion_tokens"))),
                "finish_reason": finish,
                "retries": str(retries),
            }
        )

    # ---- embeddings -----------------------------------------------------------------------
    async def embed_batch(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        self._http()
        assert self._slots is not None
        async with self._slots:
            data, _ = await self._post_json(
                "/embeddings", {"model": self.options.model, "input": list(texts), "encoding_format": "float"}
            )
        try:
            rows = sorted(data["data"], key=lambda d: d.get("index", 0))
            vectors = [[float(x) for x in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError):
            raise SaasError(self._describe("unexpected embeddings answer"), 502, 0) from None
        if len(vectors) != len(texts):
            raise SaasError(self._describe(f"{len(vectors)} embeddings for {len(texts)} texts"), 502, 0)
        return vectors

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens by tiktoken's encoding of ``saas.model`` (OpenAI's models): a vendor has no route that counts
        without generating, so this is the count where tiktoken knows the model, and an error elsewhere."""
        encoding = self._encoding()
        return [len(encoding.encode(t, disallowed_special=())) for t in texts]

    def _encoding(self):
        encoding = getattr(self, "_tiktoken", None)
        if encoding is not None:
            return encoding
        model = self.options.model
        try:
            import tiktoken
        except ImportError:
            raise NotImplementedError(f"counting tokens of {self.name} model {model!r} needs tiktoken (OpenAI's "
                                      "tokenizer): pip install tiktoken on the Ray workers") from None
        try:
            name = tiktoken.encoding_name_for_model(model)
        except KeyError:
            raise NotImplementedError(f"tiktoken does not know the tokenizer of {self.name} model {model!r} (it knows "
                                      "OpenAI's models): count with a local model of the same family "
                                      "(infer_backend='transformers' or 'llama_cpp')") from None
        try:
            self._tiktoken = tiktoken.get_encoding(name)
        except Exception as exc:  # its files come from the internet on first use, then from its cache
            raise NotImplementedError(
                f"tiktoken cannot load encoding {name!r} of {self.name} model {model!r} ({type(exc).__name__}: "
                f"{str(exc)[:200]}): it downloads the encoding on first use; on a worker without internet put the "
                "file in a folder named by TIKTOKEN_CACHE_DIR") from None
        return self._tiktoken

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "base_url": self.options.base_url,
            "saas_model": self.options.model,
            "qps": self.options.qps,
            "max_retries": self.options.max_retries,
            "timeout": self.options.timeout,
        }

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            try:
                loop = asyncio.get_event_loop()
                if loop.is_running():
                    loop.create_task(session.close())
            except Exception:
                pass
