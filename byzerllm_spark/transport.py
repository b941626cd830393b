"""The one HTTP client of the package: every call to a deployed model from the driver, an executor or a
script goes through here.

- Keep-alive sessions, one per thread (Spark tasks send several requests at once).
- Retries of connection errors and 5xx answers with bounded exponential backoff and jitter, by
  urllib3's ``Retry`` (a worker that died mid-request is replaced by Serve; the retry reaches the new
  one). A 4xx is never retried: it is the caller's mistake and the same body would fail again.
- The bearer token: the one given to ``bls.init()`` in this process, else ``$BYZERLLM_AUTH_TOKEN``.
- The errors a caller needs: :class:`ModelNotFoundError` (listing the deployed models) for a model that
  is not there, :class:`RequestError` for a refused request or exhausted retries.

Needs only ``requests`` and ``pyarrow``, so it runs in Spark executors and in JVM-less scripts alike.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Iterator

from .errors import ModelNotFoundError, RequestError, not_deployed
from .protocol import arrow, sse
from .settings import AUTH_TOKEN_ENV, OPENAI_APP

DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_RETRIES = 5
DEFAULT_BACKOFF = 0.2
MAX_BACKOFF = 10.0
RETRY_STATUS = (500, 502, 503, 504)

_local = threading.local()
#: The token ``bls.init(auth_token=...)`` gave this process (set by :mod:`.cluster`).
_token: dict[str, str | None] = {"value": None}


def set_auth_token(token: str | None) -> None:
    """Use ``token`` for every request of this process from now on (None: fall back to the environment)."""
    _token["value"] = token


def auth_token() -> str | None:
    """The bearer token this process sends: the one given to ``init()``, else ``$BYZERLLM_AUTH_TOKEN``."""
    return _token["value"] or os.environ.get(AUTH_TOKEN_ENV) or None


def _retry(max_retries: int, backoff: float):
    from urllib3.util.retry import Retry

    return Retry(
        total=max_retries,
        connect=max_retries,
        read=max_retries,
        status=max_retries,
        status_forcelist=RETRY_STATUS,
        allowed_methods=None,  # POST too: every route of a model is safe to repeat
        backoff_factor=backoff,
        backoff_max=MAX_BACKOFF,
        backoff_jitter=backoff,
        raise_on_status=False,  # the last answer comes back and is reported with its body
        respect_retry_after_header=True,
    )


def session(max_retries: int = DEFAULT_MAX_RETRIES, backoff: float = DEFAULT_BACKOFF):
    """This thread's keep-alive ``requests.Session`` for the given retry policy, with the bearer token set."""
    import requests

    sessions = getattr(_local, "sessions", None)
    if sessions is None:
        sessions = _local.sessions = {}
    key = (max_retries, backoff)
    current = sessions.get(key)
    if current is None:
        current = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=_retry(*key))
        current.mount("http://", adapter)
        current.mount("https://", adapter)
        sessions[key] = current
    token = auth_token()
    if token:
        current.headers["Authorization"] = f"Bearer {token}"
    else:
        current.headers.pop("Authorization", None)
    return current


def unauthorized(url: str) -> RequestError:
    return RequestError(
        f"{url} answered 401: the endpoint needs its bearer token; pass auth_token= to bls.init() "
        "or set BYZERLLM_AUTH_TOKEN (for Spark executors: spark.executorEnv.BYZERLLM_AUTH_TOKEN)"
    )


def deployed_routes(endpoint: str) -> list[str]:
    """Model names served at ``endpoint`` (from Serve's ``/-/routes``; the ``/v1`` app is left out)."""
    try:
        routes = session(0).get(f"{endpoint}/-/routes", timeout=10).json()
    except Exception:
        return []
    return sorted(prefix.strip("/") for prefix, app in routes.items() if prefix.strip("/") and app != OPENAI_APP)


def check_reply(resp, endpoint: str, model: str, url: str) -> None:
    """Raise the caller's error for a non-200 answer: not deployed, unauthorized, refused, or failed."""
    status = resp.status_code
    if status == 200:
        return
    if status == 404 or (status >= 500 and status != 503):
        deployed = deployed_routes(endpoint)
        if model not in deployed:
            raise not_deployed(model, deployed, endpoint)
    if status == 401:
        raise unauthorized(url)
    retries = _retries_of(resp)
    detail = f"HTTP {status}: {resp.text[:500]}"
    if status in RETRY_STATUS and retries:
        raise RequestError(f"{url} failed after {retries} retries: {detail}")
    raise RequestError(f"{url} failed: {detail}")


def post(
    endpoint: str,
    model: str,
    route: str,
    body: bytes,
    *,
    content_type: str = arrow.CONTENT_TYPE,
    timeout: float = DEFAULT_TIMEOUT,
    max_retries: int = DEFAULT_MAX_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    headers: dict | None = None,
) -> bytes:
    """POST ``body`` to ``{endpoint}/{model}/{route}`` and return the answer's bytes.

    Raises:
        ModelNotFoundError: the model is not deployed at ``endpoint`` (lists those that are).
        RequestError: a 4xx (never retried), or retries exhausted.
    """
    import requests

    url = f"{endpoint}/{model}/{route}"
    hdrs = {"Content-Type": content_type, **(headers or {})}
    try:
        resp = session(max_retries, backoff).post(url, data=body, headers=hdrs, timeout=timeout)
    except requests.RequestException as exc:
        _local.retries = max_retries
        raise RequestError(f"{url} failed after {max_retries} retries: {_reason(exc)}") from None
    _local.retries = _retries_of(resp)
    check_reply(resp, endpoint, model, url)
    return resp.content


def _retries_of(resp) -> int:
    """How many times urllib3 retried before ``resp`` (its ``Retry`` history)."""
    return len(getattr(getattr(resp.raw, "retries", None), "history", ()) or ())


def last_retries() -> int:
    """Retries the last :func:`post` of this thread needed: 0 when the first try answered, ``max_retries``
    when none did. The Spark functions add it to a query's statistics."""
    return getattr(_local, "retries", 0)


def post_arrow(endpoint: str, model: str, body: bytes, *, route: str = "arrow", **kwargs: Any) -> bytes:
    """POST an Arrow IPC body to a model's Arrow route (``arrow`` or ``embed``); see :func:`post`."""
    return post(endpoint, model, route, body, **kwargs)


def get_json(endpoint: str, model: str, route: str, *, timeout: float = 30.0) -> Any:
    """GET ``{endpoint}/{model}/{route}`` as JSON (``info``); errors as in :func:`post`."""
    import requests

    url = f"{endpoint}/{model}/{route}"
    try:
        resp = session(2).get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise RequestError(f"cannot reach {endpoint} for model {model!r}: {_reason(exc)}") from None
    check_reply(resp, endpoint, model, url)
    return resp.json()


def stream(endpoint: str, model: str, body: bytes, *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[dict]:
    """POST one JSON request to ``{endpoint}/{model}/stream``; yield its server-sent items as dicts."""
    import requests

    url = f"{endpoint}/{model}/stream"
    try:
        resp = session(0).post(url, data=body, headers={"Content-Type": "application/json"}, stream=True,
                               timeout=timeout)
    except requests.RequestException as exc:
        raise RequestError(f"{url} failed: {_reason(exc)}") from None
    with resp:
        check_reply(resp, endpoint, model, url)
        yield from sse.parse(resp.iter_lines(decode_unicode=True))


def _reason(exc: Exception) -> str:
    """The innermost cause of a requests/urllib3 error, in one line."""
    reason = getattr(getattr(exc, "args", [None])[0], "reason", None) if exc.args else None
    return f"{type(exc).__name__}: {reason or exc}"


__all__ = [
    "DEFAULT_TIMEOUT", "ModelNotFoundError", "auth_token", "check_reply", "deployed_routes", "get_json",
    "last_retries", "post", "post_arrow", "session", "set_auth_token", "stream",
]
