"""Names → backend builders. ``custom/auto`` + ``infer_backend``, plugins, and ``saas/<vendor>``.

Builders are ``"module:attr"`` strings so that nothing heavy is imported until a worker builds one.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Callable

from ..errors import BackendNotFoundError

if TYPE_CHECKING:
    from ..config import DeployConfig
    from .base import Backend

ENTRY_POINT_GROUP = "byzerllm_spark.models"
#: ``saas/<vendor>`` types are built by :mod:`.saas` (vendor table there) unless registered exactly.
SAAS_PREFIX = "saas/"

#: ``infer_backend`` names for ``pretrained_model_type="custom/auto"``.
_INFER_BACKENDS: dict[str, str] = {}
#: ``pretrained_model_type`` prefixes (``saas/<vendor>``) registered by other modules.
_MODEL_TYPES: dict[str, str] = {}


def register_infer_backend(name: str, target: str) -> None:
    """Register ``infer_backend=name`` → ``"module:Class"``. Duplicates are refused."""
    if name in _INFER_BACKENDS:
        raise ValueError(f"infer_backend {name!r} is already registered (to {_INFER_BACKENDS[name]})")
    _INFER_BACKENDS[name] = target


def register_model_type(name: str, target: str) -> None:
    """Register ``pretrained_model_type=name`` → ``"module:Class"``. Duplicates are refused."""
    if name in _MODEL_TYPES:
        raise ValueError(f"pretrained_model_type {name!r} is already registered (to {_MODEL_TYPES[name]})")
    _MODEL_TYPES[name] = target


register_infer_backend("transformers", "byzerllm_spark.backends.transformers_backend:TransformersBackend")
register_infer_backend("llama_cpp", "byzerllm_spark.backends.llama_cpp_backend:LlamaCppBackend")
register_infer_backend("embedding", "byzerllm_spark.backends.embedding_backend:EmbeddingBackend")


def infer_backends() -> list[str]:
    return sorted(_INFER_BACKENDS)


def plugin_entry_points() -> dict[str, str]:
    """Plugins installed under the entry-point group ``byzerllm_spark.models``: name → module."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_model_types() -> list[str]:
    names = ["custom/auto", "saas/<vendor>"] + sorted(_MODEL_TYPES)
    names += [f"custom/{name}" for name in sorted(plugin_entry_points())]
    return names + ["custom/<module>", "<dotted.module.path>"]


def _load(target: str) -> Callable:
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def default_infer_backend() -> str:
    """``transformers`` where torch and transformers are installed, else ``llama_cpp``.

    transformers runs the embedded GGUF dequantised to fp32 and answers the quickstart question
    ("The capital of France is Paris."); llama.cpp computes on the 4-bit weights and, greedy, drifts
    on some prompts of this 135M model (see the README), so it is the explicit choice.
    """
    import importlib.util

    if importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None:
        return "transformers"
    return "llama_cpp"


def plugin_module_name(pretrained_model_type: str) -> str | None:
    """The module a plugin type names, or None when the type is not a plugin."""
    if pretrained_model_type.startswith("custom/") and pretrained_model_type != "custom/auto":
        name = pretrained_model_type[len("custom/"):]
        return plugin_entry_points().get(name, name)
    if "/" not in pretrained_model_type and "." in pretrained_model_type:
        return pretrained_model_type
    return None


def check(config: "DeployConfig") -> str:
    """Validate the backend choice on the driver; return a description. Imports only plugins.

    Raises:
        BackendNotFoundError: the type or infer_backend is unknown, listing the available ones.
    """
    kind = config.pretrained_model_type
    if kind == "custom/auto":
        backend = config.infer_backend or default_infer_backend()
        if backend not in _INFER_BACKENDS:
            raise BackendNotFoundError(
                f"infer_backend={backend!r} is not registered; available: {', '.join(infer_backends())}"
            )
        return backend
    if kind in _MODEL_TYPES:
        return kind
    if kind.startswith(SAAS_PREFIX):
        from .saas import check_config

        return check_config(config)  # unknown vendors list the known ones
    module_name = plugin_module_name(kind)
    if module_name is not None:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise BackendNotFoundError(
                f"pretrained_model_type={kind!r}: plugin module {module_name!r} cannot be imported ({exc}); "
                f"available: {', '.join(available_model_types())}"
            ) from None
        if not callable(getattr(module, "init_model", None)):
            raise BackendNotFoundError(
                f"pretrained_model_type={kind!r}: module {module_name!r} has no init_model(model_dir, "
                "infer_params, sys_conf); see the plugin contract in the README"
            )
        return f"plugin:{module_name}"
    raise BackendNotFoundError(
        f"pretrained_model_type={kind!r} is not registered; available: {', '.join(available_model_types())}"
    )


def build(config: "DeployConfig", model_dir: str | None) -> "Backend":
    """Build the backend inside a worker. Heavy imports happen here."""
    kind = config.pretrained_model_type
    if kind == "custom/auto":
        backend = config.infer_backend or default_infer_backend()
        return _load(_INFER_BACKENDS[backend])(config, model_dir)
    if kind in _MODEL_TYPES:
        return _load(_MODEL_TYPES[kind])(config, model_dir)
    if kind.startswith(SAAS_PREFIX):
        from .saas import SaasBackend

        return SaasBackend(config, model_dir)
    module_name = plugin_module_name(kind)
    if module_name is None:
        check(config)  # raises with the list
    from .plugin import PluginBackend

    return PluginBackend(config, model_dir, importlib.import_module(module_name))
