"""The per-node cache of dequantised GGUF models: a transformers worker dequantises once, later
workers load the safetensors copy, and the answers do not change."""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from byzerllm_spark import settings  # noqa: E402
from byzerllm_spark.backends import registry  # noqa: E402
from byzerllm_spark.backends._model_files import default_model_dir, dequantised_path, find_gguf  # noqa: E402
from byzerllm_spark.config import DeployConfig  # noqa: E402
from byzerllm_spark.protocol.request import parse_request  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three primary colors."]


def _answers(backend) -> list[str]:
    reqs = [parse_request({"instruction": q, "temperature": 0, "max_length": 16}) for q in QUESTIONS]
    results = asyncio.run(backend.chat_batch(reqs))
    backend.close()
    return [r.response for r in results]


def _build():
    config = DeployConfig(model="cache_test", infer_backend="transformers", cpus_per_worker=1)
    return registry.build(config, default_model_dir())


def test_second_load_uses_the_cache_and_answers_as_the_gguf_path(tmp_path, monkeypatch):
    gguf = find_gguf(default_model_dir())
    # A cache "folder" that is a file: the backend falls back to transformers' own GGUF loading.
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("")
    monkeypatch.setenv(settings.CACHE_DIR_ENV, str(blocked))
    direct = _build()
    assert getattr(direct.model.config, "_name_or_path", "") == os.path.dirname(gguf)
    from_gguf = _answers(direct)

    monkeypatch.setenv(settings.CACHE_DIR_ENV, str(tmp_path / "cache"))
    target = dequantised_path(gguf)
    assert target.startswith(str(tmp_path / "cache"))
    first = _build()  # converts
    weights = os.path.join(target, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert first.model.config._name_or_path == target
    first.close()
    second = _build()  # loads the copy, converts nothing
    assert second.model.config._name_or_path == target
    assert os.stat(weights).st_mtime_ns == stamp
    assert not [n for n in os.listdir(os.path.dirname(target)) if ".tmp-" in n]
    assert _answers(second) == from_gguf
    assert from_gguf[0]  # a real answer, not an empty string
