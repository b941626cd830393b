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


class ModelTableError(ByzerLLMError, RuntimeError):
    """A model table cannot be saved, read or verified."""


class ChecksumError(ModelTableError):
    """A chunk of a model table does not match its recorded sha256."""


def bad_value(param: str, value: object, fix: str) -> str:
    """Format the standard message: the parameter, its bad value and how to fix it."""
    return f"{param}={value!r} is not valid: {fix}"
