"""Names, environment variables and default folders: the bottom layer, importing nothing of the package.

Every place that needs one of these reads it here, so a user changes a default in one spot.

Environment variables (all optional):

- ``BYZERLLM_HOME``: the one hidden folder for jobs, model tables, caches and the local cluster's
  address file; default ``~/.byzerllm_spark``.
- ``BYZERLLM_AUTH_TOKEN``: the bearer token callers send (and ``init()`` uses when none is passed).
- ``BYZERLLM_LOG_LEVEL``: ``WARNING`` by default; ``INFO`` or ``DEBUG`` bring back Ray's, Serve's
  and this library's logs.
- ``BYZERLLM_WAREHOUSE``, ``BYZERLLM_MODEL_CACHE``, ``BYZERLLM_CACHE_DIR``, ``BYZERLLM_RESPONSE_CACHE``:
  override single folders below the home.
"""

from __future__ import annotations

import os

#: Ray namespace of every named actor and KV entry of this library.
NAMESPACE = "byzerllm_spark"
#: Serve deployment name inside each model's application (marks applications that are models).
DEPLOYMENT_NAME = "ByzerLLMWorker"
#: Serve application of the OpenAI-compatible API, and its route prefix.
OPENAI_APP = "byzerllm_openai"
OPENAI_ROUTE = "/v1"

AUTH_TOKEN_ENV = "BYZERLLM_AUTH_TOKEN"
LOG_LEVEL_ENV = "BYZERLLM_LOG_LEVEL"
HOME_ENV = "BYZERLLM_HOME"
WAREHOUSE_ENV = "BYZERLLM_WAREHOUSE"
MODEL_CACHE_ENV = "BYZERLLM_MODEL_CACHE"
CACHE_DIR_ENV = "BYZERLLM_CACHE_DIR"
RESPONSE_CACHE_ENV = "BYZERLLM_RESPONSE_CACHE"
#: HTTP header of the Arrow route: a model function's own ``cache=`` (``CacheSpec.header()``, or ``off``).
CACHE_HEADER = "X-Byzerllm-Cache"
#: Seconds a request to a model keeps retrying connection errors and 5xx after its first failure.
RETRY_SECONDS_ENV = "BYZERLLM_RETRY_SECONDS"
#: A Serve proxy killed by hand was back after 23-30 s (three kills, 2-core machine); 60 s outlasts
#: that with room, and a head node's restart on a small cluster. Raise it for bigger clusters.
DEFAULT_RETRY_SECONDS = 60.0

DEFAULT_HTTP_PORT = 8000
DEFAULT_LOG_LEVEL = "WARNING"
MIN_TOKEN_LENGTH = 16
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

#: Keys of this library in Ray's KV store (namespace ``NAMESPACE``).
KV_ENDPOINT = b"byzerllm_spark/endpoint"
#: The head's proxy where the endpoint is each node's own (``cluster.ClusterInfo.fallback_endpoint``).
KV_FALLBACK_ENDPOINT = b"byzerllm_spark/fallback_endpoint"
KV_AUTH_DIGEST = b"byzerllm_spark/auth_sha256"


def home_dir() -> str:
    """The library's one folder: ``$BYZERLLM_HOME``, else ``~/.byzerllm_spark`` (absolute, not created)."""
    return os.path.abspath(os.path.expanduser(os.environ.get(HOME_ENV) or os.path.join("~", ".byzerllm_spark")))


def home_path(*parts: str, env: str | None = None) -> str:
    """A folder below :func:`home_dir`, or the value of ``env`` when that variable is set."""
    if env and os.environ.get(env):
        return os.path.abspath(os.path.expanduser(os.environ[env]))
    return os.path.join(home_dir(), *parts)


def jobs_dir() -> str:
    """Where finetune jobs write their output: ``<home>/jobs``."""
    return home_path("jobs")


def warehouse_dir() -> str:
    """Root of model tables given by name (``ai_model.smollm2``): ``$BYZERLLM_WAREHOUSE`` or ``<home>/warehouse``."""
    return home_path("warehouse", env=WAREHOUSE_ENV)


def model_cache_dir() -> str:
    """Materialised model-table versions: ``$BYZERLLM_MODEL_CACHE`` or ``<home>/model_cache``."""
    return home_path("model_cache", env=MODEL_CACHE_ENV)


def cache_dir() -> str:
    """Derived model files (dequantised GGUF, merged adapters): ``$BYZERLLM_CACHE_DIR`` or ``<home>/cache``."""
    return home_path("cache", env=CACHE_DIR_ENV)


def response_cache_dir() -> str:
    """The node's embedded response cache (``deploy(cache=True)``): ``$BYZERLLM_RESPONSE_CACHE`` or
    ``<home>/response_cache``."""
    return home_path("response_cache", env=RESPONSE_CACHE_ENV)


def log_level() -> str:
    """The log level of this library, Ray and Serve: ``$BYZERLLM_LOG_LEVEL``, default ``WARNING``."""
    return (os.environ.get(LOG_LEVEL_ENV) or DEFAULT_LOG_LEVEL).upper()


def progress_disable() -> bool | None:
    """tqdm's ``disable`` for bars shown only where someone watches: None (shown on a terminal, hidden in
    logs and pipes) outside notebooks; False inside a Jupyter kernel, whose streams are no terminals
    but whose bars (``tqdm.auto``: a widget) are watched."""
    import sys

    shell = sys.modules.get("IPython")
    if shell is not None and "ipykernel" in sys.modules:
        ip = shell.get_ipython() if hasattr(shell, "get_ipython") else None
        if ip is not None and type(ip).__name__ == "ZMQInteractiveShell":
            return False
    return None
