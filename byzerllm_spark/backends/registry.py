"""Names → backend builders. ``custom/auto`` + ``infer_backend``, plugins, and ``saas/<vendor>``.

Builders are ``"module:attr"`` strings so that nothing heavy is imported until a worker builds one.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Callable

from ..errors import BackendNotFoundError, ConfigError

if TYPE_CHECKING:
    from ..config import DeployConfig
    from .base import Backend

ENTRY_POINT_GROUP = "byzerllm_spark.models"
#: ``saas/<vendor>`` types are built by :mod:`.saas` (vendor table there) unless registered exactly.
SAAS_PREFIX = "saas/"

#: ``infer_backend`` names for ``pretrained_model_type="custom/auto"``.
_INFER_BACKENDS: dict[str, str] = {}


def register_infer_backend(name: str, target: str) -> None:
    """Register ``infer_backend=name`` → ``"module:Class"``.

    Raises:
        ConfigError: ``name`` is already registered (duplicates are refused).
    """
    if name in _INFER_BACKENDS:
        raise ConfigError(f"infer_backend {name!r} is already registered (to {_INFER_BACKENDS[name]}); pick another name")
    _INFER_BACKENDS[name] = target


register_infer_backend("transformers", "byzerllm_spark.backends.transformers_backend:TransformersBackend")
register_infer_backend("llama_cpp", "byzerllm_spark.backends.llama_cpp_backend:LlamaCppBackend")
register_infer_backend("embedding", "byzerllm_spark.backends.embedding_backend:EmbeddingBackend")
register_infer_backend("vllm", "byzerllm_spark.backends.vllm_backend:VllmBackend")


def default_worker_concurrency(pretrained_model_type: str, infer_backend: str | None) -> int:
    """``worker_concurrency`` when ``deploy()`` is not given one: the backend class's
    ``default_worker_concurrency`` (64 for vllm, which batches the rows of all its requests itself), else 1.
    Imports only the backend's module (never its engine)."""
    if pretrained_model_type != "custom/auto":
        return 1
    target = _INFER_BACKENDS.get(infer_backend or default_infer_backend())
    return int(getattr(_load(target), "default_worker_concurrency", 1)) if target else 1


def infer_backends() -> list[str]:
    return sorted(_INFER_BACKENDS)


def plugin_entry_points() -> dict[str, str]:
    """Plugins installed under the entry-point group ``byzerllm_spark.models``: name → module."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_model_types() -> list[str]:
    names = ["custom/auto", "saas/<vendor>"]
    names += [f"custom/{name}" for name in sorted(plugin_entry_points())]
    return names + ["custom/<module>", "<module or dotted.module.path>"]


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
    """The module a plugin type names, or None when the type is not a plugin.

    ``custom/<name>`` and a bare ``<name>`` (Byzer-LLM's ``pretrainedModelType="llama"`` style) name an
    entry point of the group ``byzerllm_spark.models``, else an importable module; a dotted path names
    a module.
    """
    kind = pretrained_model_type
    if kind == "custom/auto" or kind.startswith(SAAS_PREFIX):
        return None
    name = kind[len("custom/"):] if kind.startswith("custom/") else kind
    if not name or "/" in name:
        return None  # e.g. Byzer-LLM's sft/<model> types: finetuning, not serving
    return plugin_entry_points().get(name, name)


def check(config: "DeployConfig") -> str:
    """Validate the backend choice and its ``infer_params`` keys on the driver; return a description.

    Imports plugins, and llama.cpp when installed (to read its arguments); never torch.

    Raises:
        BackendNotFoundError: the type or infer_backend is unknown, listing the available ones.
        ConfigError: an ``infer_params`` key the backend would not use, listing the valid ones.
    """
    kind = config.pretrained_model_type
    if kind == "custom/auto":
        backend = config.infer_backend or default_infer_backend()
        if backend not in _INFER_BACKENDS:
            raise BackendNotFoundError(
                f"infer_backend={backend!r} is not registered; available: {', '.join(infer_backends())}"
            )
        _load(_INFER_BACKENDS[backend]).check_config(config)
        return backend
    if kind.startswith(SAAS_PREFIX):
        from .saas import check_config

        return check_config(config)  # unknown vendors list the known ones
    module = load_plugin(kind)
    return f"plugin:{module.__name__}"


def load_plugin(kind: str):
    """Import the plugin module that ``pretrained_model_type=kind`` names and check its contract.

    Raises:
        BackendNotFoundError: no such module, or it has no ``init_model`` (Byzer-LLM's plugin contract).
    """
    module_name = plugin_module_name(kind)
    if module_name is None:
        raise BackendNotFoundError(
            f"pretrained_model_type={kind!r} is not a type that can be served; available: "
            f"{', '.join(available_model_types())}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if not (missing and (module_name == missing or module_name.startswith(missing + "."))):
            raise BackendNotFoundError(  # the plugin is there; its own imports failed
                f"pretrained_model_type={kind!r}: plugin module {module_name!r} failed to import: {exc}"
            ) from exc
        raise BackendNotFoundError(
            f"pretrained_model_type={kind!r}: no plugin module {module_name!r} is installed (it cannot be imported). "
            f"Available: {', '.join(available_model_types())}. Byzer-LLM's built-in model types "
            "(llama, chatglm, ...) are served here by 'custom/auto' with infer_backend='transformers' or "
            "'llama_cpp'"
        ) from None
    if not callable(getattr(module, "init_model", None)):
        raise BackendNotFoundError(
            f"pretrained_model_type={kind!r}: module {module_name!r} has no init_model(model_dir, "
            "infer_params, sys_conf), the first function of Byzer-LLM's plugin contract (see the README's "
            "plugin section)"
        )
    return module


def build(config: "DeployConfig", model_dir: str | None) -> "Backend":
    """Build the backend inside a worker. Heavy imports happen here."""
    kind = config.pretrained_model_type
    if kind == "custom/auto":
        backend = config.infer_backend or default_infer_backend()
        return _load(_INFER_BACKENDS[backend])(config, model_dir)
    if kind.startswith(SAAS_PREFIX):
        from .saas import SaasBackend

        return SaasBackend(config, model_dir)
    from .plugin import PluginBackend

    # Byzer-LLM gives init_model the localModelDir it was deployed with: a plugin deployed without
    # model_path or model_table gets None, never the built-in engines' default model.
    given = model_dir if (config.model_path or config.model_table) else None
    return PluginBackend(config, given, load_plugin(kind))
