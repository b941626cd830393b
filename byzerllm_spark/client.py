"""Calling a deployed model over HTTP: the same Arrow request that Spark and the JVM send.

The client needs only ``requests`` and ``pyarrow``, so it also runs in Spark executors. It retries
connection errors and 5xx answers (a worker that died mid-request is replaced by Serve) with
bounded exponential backoff. When the endpoint needs a bearer token (``bls.init(auth_token=...)``)
every request sends it: the token given to ``init()`` in this process, else ``$BYZERLLM_AUTH_TOKEN``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any, Iterable, Iterator, Sequence

from . import _arrow
from .errors import ModelNotFoundError, RequestError
from .request import build_params

DEFAULT_TIMEOUT = 600.0
RETRY_STATUS = {500, 502, 503, 504}

_local = threading.local()


def _session():
    import requests

    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _local.session = session
    from .cluster import auth_token

    token = auth_token()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    else:
        session.headers.pop("Authorization", None)
    return session


def _unauthorized(url: str) -> RequestError:
    return RequestError(
        f"{url} answered 401: the endpoint needs its bearer token; pass auth_token= to bls.init() "
        "or set BYZERLLM_AUTH_TOKEN (for Spark executors: spark.executorEnv.BYZERLLM_AUTH_TOKEN)"
    )


def deployed_routes(endpoint: str) -> list[str]:
    """Model names served at ``endpoint`` (from Serve's ``/-/routes``; the ``/v1`` app is left out)."""
    try:
        routes = _session().get(f"{endpoint}/-/routes", timeout=10).json()
    except Exception:
        return []
    from .serving._openai import OPENAI_APP

    return sorted(prefix.strip("/") for prefix, app in routes.items() if prefix.strip("/") and app != OPENAI_APP)


def post_arrow(
    endpoint: str,
    model: str,
    body: bytes,
    *,
    route: str = "arrow",
    timeout: float = DEFAULT_TIMEOUT,
    max_retries: int = 5,
    backoff: float = 0.2,
    headers: dict | None = None,
) -> bytes:
    """POST an Arrow body to ``{endpoint}/{model}/{route}``; retry transient failures.

    Raises:
        ModelNotFoundError: the model is not deployed at the endpoint (lists those that are).
        RequestError: a non-retryable HTTP error, or retries exhausted.
    """
    import requests

    url = f"{endpoint}/{model}/{route}"
    hdrs = {"Content-Type": _arrow.CONTENT_TYPE}
    if headers:
        hdrs.update(headers)
    attempt = 0
    while True:
        try:
            resp = _session().post(url, data=body, headers=hdrs, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            error = f"{type(exc).__name__}: {exc}"
            status = None
        else:
            if resp.status_code == 200:
                return resp.content
            status = resp.status_code
            error = f"HTTP {status}: {resp.text[:500]}"
            if status == 404:
                deployed = deployed_routes(endpoint)
                if model not in deployed:
                    raise ModelNotFoundError(
                        f"model {model!r} is not deployed at {endpoint}; deployed models: "
                        f"{deployed if deployed else 'none'} (bls.deploy(...) first)"
                    )
            if status == 401:
                raise _unauthorized(url)
            if status not in RETRY_STATUS:
                raise RequestError(f"{url} failed: {error}")
        attempt += 1
        if attempt > max_retries:
            raise RequestError(f"{url} failed after {max_retries} retries: {error}")
        time.sleep(min(backoff * 2 ** (attempt - 1), 10.0) * (0.5 + random.random()))


def request_batch(endpoint: str, model: str, params: Sequence[Any], **kwargs: Any):
    """Send request dicts (or JSON strings, or None) and return the result table."""
    encoded = [None if p is None else (p if isinstance(p, str) else json.dumps(p, ensure_ascii=False)) for p in params]
    return _arrow.decode_results(post_arrow(endpoint, model, _arrow.encode_params(encoded), **kwargs))


def chat(model: str, instruction: str | None = None, *, endpoint: str | None = None, **params: Any) -> str:
    """Ask a deployed model one question and return the answer text.

    Args:
        model: the deployed model's name.
        instruction: the user's question (or pass ``messages=[...]`` OpenAI-style instead).
        endpoint: base URL; default ``bls.endpoint()``.
        **params: the ``llm_param`` keys: ``temperature``, ``max_length``, ``top_p``,
            ``system_msg``, ``history``, ``user_role``, ``assistant_role``, ``messages``, and
            ``generation_<name>`` (or ``**{"generation.<name>": v}``) for model-specific values.

    Raises:
        ModelNotFoundError: the model is not deployed (lists the deployed ones).
        RequestError: the model answered with an error (the message says why).

    Example:
        >>> bls.chat("chat", "What is the capital of France?", temperature=0, max_length=32)  # doctest: +SKIP
        'The capital of France is Paris.'
    """
    (result,) = chat_batch(model, [build_params(instruction, **params)], endpoint=endpoint, raise_on_error=True)
    return result


def stream_chat(
    model: str,
    instruction: str | None = None,
    *,
    endpoint: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    **params: Any,
) -> Iterator[str]:
    """Ask a deployed model one question; yield the answer's text pieces as they come.

    Takes the arguments of :func:`chat`. Backends that stream (SaaS vendors, llama.cpp, plugins
    returning a generator) yield many pieces; the others one.

    Raises:
        ModelNotFoundError: the model is not deployed (lists the deployed ones).
        RequestError: the request was refused or the model failed (also midway through).

    Example:
        >>> for piece in bls.stream_chat("chat", "Tell me a story", max_length=64):  # doctest: +SKIP
        ...     print(piece, end="", flush=True)
    """
    import requests

    if endpoint is None:
        from .cluster import endpoint as _endpoint

        endpoint = _endpoint()
    url = f"{endpoint}/{model}/stream"
    body = json.dumps(build_params(instruction, **params), ensure_ascii=False).encode("utf-8")
    try:
        resp = _session().post(url, data=body, headers={"Content-Type": "application/json"}, stream=True,
                               timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise RequestError(f"{url} failed: {type(exc).__name__}: {exc}") from exc
    with resp:
        if resp.status_code == 404 and model not in deployed_routes(endpoint):
            deployed = deployed_routes(endpoint)
            raise ModelNotFoundError(
                f"model {model!r} is not deployed at {endpoint}; deployed models: "
                f"{deployed if deployed else 'none'} (bls.deploy(...) first)"
            )
        if resp.status_code == 401:
            raise _unauthorized(url)
        if resp.status_code != 200:
            raise RequestError(f"model {model!r} could not answer: HTTP {resp.status_code}: {resp.text[:500]}")
        for line in resp.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            item = json.loads(line[5:])
            if "text" in item:
                yield item["text"]
            elif "error" in item:
                raise RequestError(f"model {model!r} failed while answering: {item['error']}")
            elif "metadata" in item:
                return


def chat_batch(
    model: str,
    requests_: Iterable[Any],
    *,
    endpoint: str | None = None,
    raise_on_error: bool = False,
    with_metadata: bool = False,
    batch_size: int = 1000,
) -> list:
    """Send many requests at once, answered in order.

    Args:
        requests_: strings (instructions) or dicts of ``llm_param`` keys.
        raise_on_error: raise on the first failed row instead of returning its error.
        with_metadata: return dicts ``{"response", "error", "metadata"}`` instead of texts.

    Returns:
        One entry per request: the answer text (None for a failed row unless raise_on_error),
        or the dict form with ``with_metadata=True``.
    """
    if endpoint is None:
        from .cluster import endpoint as _endpoint

        endpoint = _endpoint()
    items = [build_params(r) if isinstance(r, str) else r for r in requests_]
    out: list = []
    for start in range(0, len(items), batch_size):
        table = request_batch(endpoint, model, items[start : start + batch_size])
        responses = table.column("response").to_pylist()
        errors = table.column("error").to_pylist()
        metadata = table.column("metadata").to_pylist()
        for response, error, meta in zip(responses, errors, metadata):
            if error and raise_on_error:
                raise RequestError(f"model {model!r} could not answer: {error}")
            if with_metadata:
                out.append({"response": response, "error": error, "metadata": dict(meta or [])})
            else:
                out.append(response)
    return out


def embed(model: str, texts: Sequence[str], *, endpoint: str | None = None) -> list[list[float]]:
    """Embeddings of ``texts`` from a model deployed with an embedding backend."""
    if endpoint is None:
        from .cluster import endpoint as _endpoint

        endpoint = _endpoint()
    body = post_arrow(endpoint, model, _arrow.encode_params(list(texts)), route="embed")
    table = _arrow.decode_results(body)
    errors = [e for e in table.column("error").to_pylist() if e]
    if errors:
        raise RequestError(f"model {model!r} could not embed: {errors[0]}")
    return table.column("embedding").to_pylist()
