"""The base model of a training job as a Hugging Face directory.

Training needs ordinary weights. A Hugging Face directory is used as it is; a GGUF file (the
embedded SmolLM2 when ``model_path`` is None) is dequantised once per node into
``settings.cache_dir()`` (``$BYZERLLM_CACHE_DIR``, default ``~/.byzerllm_spark/cache``), the same
copy the transformers backend loads (``backends._model_files.dequantised_dir``).
"""

from __future__ import annotations

from ..backends._model_files import check_model_path, default_model_dir, dequantised_dir, find_gguf, is_hf_dir


def check_base_model(model_path: str | None) -> None:
    """Fail fast, on the driver, when ``model_path`` is not a model (ConfigError naming it)."""
    if model_path is None:
        default_model_dir()  # raises when the embedded model is not installed
        return
    check_model_path("model_path", model_path)


def hf_base_dir(model_path: str | None) -> str:
    """A Hugging Face directory holding the base model (converted from GGUF when needed)."""
    path = model_path if model_path is not None else default_model_dir()
    check_model_path("model_path", path)
    if is_hf_dir(path):
        return path
    gguf = find_gguf(path)
    assert gguf is not None  # check_model_path guarantees it
    return dequantised_dir(gguf)
