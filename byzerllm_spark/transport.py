"""The one HTTP client of the package: every call to a deployed model from the driver, an executor or a
script goes through here.

- Keep-alive sessions, one per thread (Spark tasks send several requests at once).
- Retries of connection errors and 5xx answers with bounded exponential backoff and jitter, by
  urllib3's ``Retry`` (a worker that died mid-request is replaced by Serve; the retry reaches the new
  one). The budget is time, not a count: a request keeps trying for ``retry_seconds`` after its first
  failure (default 60 s, ``$BYZERLLM_RETRY_SECONDS``), so a Serve proxy or head node that restarts
  (23-30 s measured) does not fail a running query. A 4xx is never retried: it is the caller's mistake
  and the same body would fail again.
- The bearer token: the one given to ``bls.init()`` in this process, else ``$BYZERLLM_AUTH_TOKEN``.
- The errors a caller needs: :class:`ModelNotFoundError` (listing the deployed models) for a model that
  is not there, :class:`RequestError` for a refused request or exhausted retries.

Needs only ``requests`` and ``pyarrow``, so it runs in Spark executors and in JVM-less scripts alike.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator

from .errors import ConfigError, ModelNotFoundError, RequestError, bad_value, not_deployed
from .protocol import arrow, sse
from .settings import AUTH_TOKEN_ENV, DEFAULT_RETRY_SECONDS, OPENAI_APP, RETRY_SECONDS_ENV

DEFAULT_TIMEOUT = 600.0
#: No count limit by default: ``retry_seconds`` bounds the retries.
DEFAULT_MAX_RETRIES = None
DEFAULT_BACKOFF = 0.2
#: Longest wait between two tries: a proxy that comes back is found within 4 s (a refused connection
#: costs nothing to retry).
MAX_BACKOFF = 4.0
RETRY_STATUS = (500, 502, 503, 504)
#: The stream route answers a SaaS vendor's refusal as 502 (``errors.answer_status``): only Serve's
#: own "not ready / overloaded" answers are retried there.
STREAM_RETRY_STATUS = (503, 504)

_local = threading.local()
#: The token ``bls.init(auth_token=...)`` gave this process (set by :mod:`.cluster`).
_token: dict[str, str | None] = {"value": None}


_reachable: dict[tuple[str, str, str | None], str] = {}


def local_or_fallback(endpoint: str, fallback: str | None, model: str | None = None) -> str:
    """``endpoint`` when this cluster's proxy listens there, else ``fallback`` (once per process, pair and model).

    A cluster started with ``proxy_location="EveryNode"`` gives its executors the endpoint
    ``http://127.0.0.1:<port>``: their own node's Serve proxy. Serve runs a proxy only on the head and
    on nodes that hold a worker of some model, so an executor on another node sends to the head's
    proxy (``fallback``) instead. With ``model``, a proxy that listens locally but does not serve it
    while ``fallback`` does (another Ray cluster's Serve on the same port of this host) is passed over too.
    """
    if not fallback or fallback == endpoint:
        return endpoint
    key = (endpoint, fallback, model)
    if key not in _reachable:
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(endpoint)
        try:
            socket.create_connection((parts.hostname, parts.port or 80), timeout=2).close()
            listening = True
        except OSError:
            listening = False
        if listening and model is not None and model not in deployed_routes(endpoint):
            listening = model not in deployed_routes(fallback)  # neither serves it: the caller's error names it
        _reachable[key] = endpoint if listening else fallback
    return _reachable[key]


def set_auth_token(token: str | None) -> None:
    """Use ``token`` for every request of this process from now on (None: fall back to the environment)."""
    _token["value"] = token


def auth_token() -> str | None:
    """The bearer token this process sends: the one given to ``init()``, else ``$BYZERLLM_AUTH_TOKEN``."""
    return _token["value"] or os.environ.get(AUTH_TOKEN_ENV) or None


def retry_seconds(value: float | None = None) -> float:
    """The retry budget in seconds: ``value`` if given, else ``$BYZERLLM_RETRY_SECONDS``, else 60.

    Raises:
        ConfigError: not a number >= 0 (naming the parameter or the environment variable).
    """
    name, raw = ("retry_seconds", value) if value is not None else (RETRY_SECONDS_ENV, os.environ.get(RETRY_SECONDS_ENV))
    if raw is None or raw == "":
        return DEFAULT_RETRY_SECONDS
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = -1.0
    if isinstance(raw, bool) or not 0 <= seconds < float("inf"):
        raise ConfigError(bad_value(name, raw, f"pass seconds as a number >= 0 (default {DEFAULT_RETRY_SECONDS:g}; "
                                               "0 never retries)"))
    return seconds


def _retry_class():
    from urllib3.util.retry import Retry

    class DeadlineRetry(Retry):
        """urllib3's ``Retry`` with a time budget: exhausted once ``budget_s`` have passed since the first
        failure (its backoff never sleeps past that), whatever the count."""

        def __init__(self, *args: Any, budget_s: float = DEFAULT_RETRY_SECONDS, first_failure: float | None = None,
                     **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.budget_s = budget_s
            self.first_failure = first_failure

        def new(self, **kw: Any) -> "DeadlineRetry":
            kw.setdefault("budget_s", self.budget_s)
            kw.setdefault("first_failure", self.first_failure)
            return super().new(**kw)

        def increment(self, *args: Any, **kwargs: Any) -> "DeadlineRetry":
            _local.tries = len(self.history) + 1
            start = self if self.first_failure is not None else self.new(first_failure=time.monotonic())
            return Retry.increment(start, *args, **kwargs)

        def is_exhausted(self) -> bool:
            if self.first_failure is not None and time.monotonic() - self.first_failure >= self.budget_s:
                return True
            return super().is_exhausted()

        def get_backoff_time(self) -> float:
            wait = super().get_backoff_time()
            if self.first_failure is None:
                return wait
            return max(0.0, min(wait, self.budget_s - (time.monotonic() - self.first_failure)))

    return DeadlineRetry


def _retry(budget_s: float, max_retries: int | None, backoff: float, status: tuple[int, ...] = RETRY_STATUS):
    count = 10**6 if max_retries is None else max_retries
    return _retry_class()(
        total=count,
        connect=count,
        read=count,
        status=count,
        other=0,
        status_forcelist=status,
        allowed_methods=None,  # POST too: every route of a model is safe to repeat
        backoff_factor=backoff,
        backoff_max=MAX_BACKOFF,
        backoff_jitter=backoff,
        raise_on_status=False,  # the last answer comes back and is reported with its body
        respect_retry_after_header=True,
        budget_s=budget_s,
    )


def session(max_retries: int | None = DEFAULT_MAX_RETRIES, backoff: float = DEFAULT_BACKOFF, *,
            budget_s: float | None = None, status: tuple[int, ...] = RETRY_STATUS):
    """This thread's keep-alive ``requests.Session`` for the given retry policy, with the bearer token set.

    ``budget_s`` (default :func:`retry_seconds`) bounds the retries in time; ``max_retries`` (default
    None: no limit) also bounds their count, ``0`` never retries."""
    import requests

    sessions = getattr(_local, "sessions", None)
    if sessions is None:
        sessions = _local.sessions = {}
    if budget_s is None:
        budget_s = retry_seconds() if max_retries != 0 else 0.0
    key = (budget_s, max_retries, backoff, status)
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
        raise RequestError(f"{url} failed after {retries} retries (the retry budget, retry_seconds= or "
                           f"${RETRY_SECONDS_ENV}, was spent): {detail}")
    raise RequestError(f"{url} failed: {detail}")


def _budget(value: float | None, max_retries: int | None) -> float:
    return 0.0 if max_retries == 0 and value is None else retry_seconds(value)


def _gave_up(url: str, retries: int, elapsed: float, budget: float, reason: str) -> str:
    return (f"{url} failed after {retries} retries in {elapsed:.0f} s: {reason}. The retry budget was "
            f"retry_seconds={budget:g}; raise it (retry_seconds=, or ${RETRY_SECONDS_ENV} for every call "
            "of this process) when the cluster needs longer to come back")


def post(
    endpoint: str,
    model: str,
    route: str,
    body: bytes,
    *,
    content_type: str = arrow.CONTENT_TYPE,
    timeout: float = DEFAULT_TIMEOUT,
    max_retries: int | None = DEFAULT_MAX_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    headers: dict | None = None,
    retry_seconds: float | None = None,
) -> bytes:
    """POST ``body`` to ``{endpoint}/{model}/{route}`` and return the answer's bytes.

    Connection errors and 5xx are retried for ``retry_seconds`` after the first failure (default
    ``$BYZERLLM_RETRY_SECONDS`` or 60 s); ``max_retries`` also caps their count (default None: no cap).

    Raises:
        ModelNotFoundError: the model is not deployed at ``endpoint`` (lists those that are).
        RequestError: a 4xx (never retried), or the retry budget spent.
    """
    import requests

    url = f"{endpoint}/{model}/{route}"
    hdrs = {"Content-Type": content_type, **(headers or {})}
    budget = _budget(retry_seconds, max_retries)
    _local.tries = 0
    started = time.monotonic()
    try:
        resp = session(max_retries, backoff, budget_s=budget).post(url, data=body, headers=hdrs, timeout=timeout)
    except requests.RequestException as exc:
        _local.retries = max(0, getattr(_local, "tries", 1) - 1)
        raise RequestError(_gave_up(url, _local.retries, time.monotonic() - started, budget, _reason(exc))) from None
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
        resp = session().get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise RequestError(f"cannot reach {endpoint} for model {model!r}: {_reason(exc)}") from None
    check_reply(resp, endpoint, model, url)
    return resp.json()


def stream(endpoint: str, model: str, body: bytes, *, timeout: float = DEFAULT_TIMEOUT,
           retry_seconds: float | None = None) -> Iterator[dict]:
    """POST one JSON request to ``{endpoint}/{model}/stream``; yield its server-sent items as dicts.

    Retried as :func:`post` until the answer starts (connection errors, 503, 504); never once text came."""
    import requests

    url = f"{endpoint}/{model}/stream"
    budget = _budget(retry_seconds, None)
    _local.tries = 0
    started = time.monotonic()
    try:
        resp = session(None, budget_s=budget, status=STREAM_RETRY_STATUS).post(
            url, data=body, headers={"Content-Type": "application/json"}, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        tries = max(0, getattr(_local, "tries", 1) - 1)
        raise RequestError(_gave_up(url, tries, time.monotonic() - started, budget, _reason(exc))) from None
    with resp:
        check_reply(resp, endpoint, model, url)
        yield from sse.parse(resp.iter_lines(decode_unicode=True))


def _reason(exc: Exception) -> str:
    """The innermost cause of a requests/urllib3 error, in one line."""
    reason = getattr(getattr(exc, "args", [None])[0], "reason", None) if exc.args else None
    return f"{type(exc).__name__}: {reason or exc}"


__all__ = [
    "DEFAULT_TIMEOUT", "ModelNotFoundError", "auth_token", "check_reply", "deployed_routes", "get_json",
    "last_retries", "post", "post_arrow", "retry_seconds", "session", "set_auth_token", "stream",
]
