"""Bearer-token check of the HTTP routes (``bls.init(auth_token=...)``).

Ray Serve's proxy takes no middleware, so every ingress of this library (the model workers and the
OpenAI app) checks ``Authorization: Bearer <token>`` itself. The cluster keeps only the token's
sha256 (in the cluster's key-value actor, :mod:`._kv`, in memory), never the token; a replica reads it when it starts.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Mapping

from . import _kv
from .settings import KV_AUTH_DIGEST



def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def stored_digest() -> str | None:
    """The digest this cluster's endpoint requires, or None when it is open (loopback only)."""
    value = _kv.get(KV_AUTH_DIGEST)
    return value.decode() if value else None


def publish(token: str | None) -> None:
    """Record the token's digest for replicas started from now on (None: no token)."""
    if token:
        _kv.put(KV_AUTH_DIGEST, digest(token).encode())
    else:
        _kv.delete(KV_AUTH_DIGEST)


def authorized(headers: Mapping[str, str], required: str | None) -> bool:
    if not required:
        return True
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return False
    return hmac.compare_digest(digest(value.strip()), required)


UNAUTHORIZED = (
    "missing or wrong bearer token: this endpoint was started with bls.init(auth_token=...); send "
    "'Authorization: Bearer <token>' (bls.chat and the Spark functions send BYZERLLM_AUTH_TOKEN / the "
    "token given to bls.init; an OpenAI client passes it as api_key)"
)


def unauthorized_response(openai_style: bool = False):
    from starlette.responses import JSONResponse, PlainTextResponse

    headers = {"WWW-Authenticate": "Bearer"}
    if openai_style:
        body = {"error": {"message": UNAUTHORIZED, "type": "authentication_error", "param": None, "code": "invalid_api_key"}}
        return JSONResponse(body, status_code=401, headers=headers)
    return PlainTextResponse(UNAUTHORIZED, status_code=401, headers=headers)
