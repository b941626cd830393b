"""One exception tree. Every message names the parameter, the bad value and the fix."""

from __future__ import annotations


class ByzerLLMError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(ByzerLLMError, ValueError):
    """A parameter or configuration key has a bad name or value."""


class BackendNotFoundError(ConfigError):
    """An unknown backend, model type or plugin was asked for."""


class ModelNotFoundError(ByzerLLMError, LookupError):
    """A model that is not deployed (or a model table that does not exist) was asked for."""


class DeploymentError(ByzerLLMError, RuntimeError):
    """A deployment could not be created or did not become ready."""


class ResourceError(DeploymentError):
    """The requested resources can never be satisfied by the cluster."""


class ClusterError(ByzerLLMError, RuntimeError):
    """Ray or Serve is not running, or cannot be reached."""


class RequestError(ByzerLLMError, RuntimeError):
    """A request to a deployed model failed."""


class JobError(ByzerLLMError, RuntimeError):
    """A training job failed, was stopped, or is not known to the cluster."""


class ModelTableError(ByzerLLMError, RuntimeError):
    """A model table cannot be saved, read or verified."""


class ChecksumError(ModelTableError):
    """A chunk of a model table does not match its recorded sha256."""


def bad_value(param: str, value: object, fix: str) -> str:
    """Format the standard message: the parameter, its bad value and how to fix it."""
    return f"{param}={value!r} is not valid: {fix}"


class RequestParseError(RequestError, ValueError):
    """One request (row) is malformed: that row gets this error; the other rows are answered."""


class RequestRefusedError(RequestError):
    """A request its model cannot answer as asked (a parameter this engine does not honour, a prompt longer than
    the model's context): the caller's error, answered 400 with OpenAI's ``param`` (and ``code``) set, never
    retried. ``param`` names the request field (``logprobs``, ``tools``, ``messages``)."""

    status = 400

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code

    def metadata(self) -> dict[str, str]:
        """The row metadata that carries this error to the routes (``http_status``, ``param``, ``code``)."""
        out = {"http_status": "400", "param": self.param}
        if self.code:
            out["code"] = self.code
        return out


class ContextLengthError(RequestRefusedError):
    """The prompt does not fit the model's context window (OpenAI's ``context_length_exceeded``)."""

    def __init__(self, prompt_tokens: int, context: int, param: str = "messages") -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens, more than this model's context of {context} tokens holds "
            f"with room for an answer; shorten {param} (or deploy with a larger context, e.g. n_ctx= for llama_cpp)",
            param, "context_length_exceeded")
        self.prompt_tokens = prompt_tokens
        self.context = context


class SaasError(RequestError):
    """A SaaS vendor call failed for good. ``status`` is the vendor's HTTP status (502: no answer)."""

    def __init__(self, message: str, status: int = 502, retries: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.retries = retries

    def metadata(self) -> dict[str, str]:
        return {"http_status": str(self.status), "retries": str(self.retries)}


#: Vendor statuses that, passed on as they are, would make our caller blame its own credentials or its
#: own URL (the vendor refused *the deployment's* ``saas.api_key`` or ``saas.model``): answered as 502.
UPSTREAM_FAULTS = frozenset({401, 403, 404, 407})


def answer_status(upstream: int | str | None) -> int:
    """The HTTP status a route of ours answers for an error whose upstream (a SaaS vendor) said
    ``upstream``: its auth and not-found errors become 502 Bad Gateway (the message says which vendor
    and to check ``saas.api_key``); a quota 429 and other statuses pass on; anything else is 500."""
    try:
        status = int(upstream)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 500
    if status in UPSTREAM_FAULTS:
        return 502
    return status if 400 <= status < 600 else 500


def not_deployed(model: str, deployed: list[str], where: str | None = None) -> ModelNotFoundError:
    """The one "model is not deployed" error: names the model, where it was looked for, and what is there."""
    at = f" at {where}" if where else ""
    listing = ", ".join(repr(m) for m in deployed) if deployed else "none"
    return ModelNotFoundError(
        f"model {model!r} is not deployed{at}; deployed models: {listing}. Deploy it with "
        f"bls.deploy({model!r}, ...) or `byzerllm deploy --model {model}`, or check the name"
    )


def check_int(param: str, value: object, minimum: int = 1, example: int | None = None) -> int:
    """``value`` as an int >= ``minimum`` (bools refused), else :class:`ConfigError` naming ``param``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(bad_value(param, value, f"use an integer >= {minimum}, e.g. {example or max(minimum, 1)}"))
    return value
