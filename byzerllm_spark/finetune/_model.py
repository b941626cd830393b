"""The base model of a training job as a Hugging Face directory.

Training needs ordinary weights. A Hugging Face directory is used as it is; a GGUF file (the
embedded SmolLM2 when ``model_path`` is None) is dequantised by transformers once per node and
saved as a Hugging Face directory under the cache (``$BYZERLLM_CACHE_DIR``, default
``~/.cache/byzerllm_spark``), keyed by the file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid

from ..backends._model_files import check_model_path, default_model_dir, find_gguf, is_hf_dir


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("BYZERLLM_CACHE_DIR", "~/.cache/byzerllm_spark"))


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
    st = os.stat(gguf)
    key = hashlib.sha256(f"{os.path.abspath(gguf)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = os.path.join(cache_root(), "hf", f"{os.path.basename(gguf)[:-5]}-{key}")
    if is_hf_dir(target):
        return target
    import transformers

    src, name = os.path.dirname(gguf), os.path.basename(gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained (it is marked quantized); its dequantised weights
    # go into a plain model built from the same config instead.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: a concurrent converter's copy wins, ours is dropped
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
