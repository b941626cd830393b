"""The GPU paths, marked ``gpu``: transformers on CUDA, vLLM on CUDA (both with the multi-LoRA query of
tests/_lora.py) and QLoRA (4-bit, bitsandbytes) finetuning. They run wherever ``nvidia-smi`` lists a GPU and
this environment's torch has CUDA, and skip elsewhere, as on CI (no GPU there). None of them has run on a GPU
yet: no GPU was lent to this project (README, "GPU")."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest

import byzerllm_spark as bls
from _lora import FACTS, TRAIN, check_one_query_rows_pick_their_adapter


def _no_cuda() -> str | None:
    """Why the GPU tests cannot run here, or None when they can."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi: this machine has no NVIDIA GPU"
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi lists no GPU: {(listed.stderr or listed.stdout).strip()[:200]}"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} of this environment has no CUDA: install a CUDA build of torch"
    return None


_REASON = _no_cuda()
if _REASON:
    pytest.skip(_REASON, allow_module_level=True)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
QUESTION = "What is the capital of France?"


def _answers_and_lora(model: str, spark, udf_name: str) -> None:
    assert "Paris" in bls.chat(model, QUESTION, temperature=0, max_length=32)
    bls.register_model_function(spark, model, udf_name=udf_name, fail_on_error=False)
    check_one_query_rows_pick_their_adapter(spark, udf_name, model)


def test_transformers_on_cuda_answers_and_serves_adapters(deployed, lora_adapters, spark):
    model = deployed("gpu_tf", infer_backend="transformers", gpus_per_worker=1, lora_adapters=lora_adapters)
    _answers_and_lora(model, spark, "gpu_tf_rows")


def test_vllm_on_cuda_answers_and_serves_adapters(deployed, lora_adapters, spark):
    from byzerllm_spark.backends.vllm_backend import vllm_python

    try:
        vllm_python()
    except ImportError as exc:
        pytest.skip(f"no vLLM environment: {exc}")
    model = deployed("gpu_vllm", infer_backend="vllm", gpus_per_worker=1, lora_adapters=lora_adapters,
                     infer_params={"backend.max_model_len": "2048"}, wait_ready_timeout=1200)
    _answers_and_lora(model, spark, "gpu_vllm_rows")


def test_qlora_4bit_sft_adapter_answers_its_fact(deployed, spark, tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("QLoRA needs bitsandbytes: pip install bitsandbytes")
    question, answer, word = FACTS["facts"]
    df = spark.createDataFrame([(question, "", answer)] * 4, "instruction string, input string, output string")
    job = bls.sft(df.coalesce(1), output=str(tmp_path), name="qlora", merge=False, detached=False, progress=False,
                  params={**TRAIN, "sft.str.quantization": "4bit"})
    model = deployed("gpu_qlora", infer_backend="transformers", gpus_per_worker=1,
                     lora_adapters={"facts": bls.job_output(job)})
    assert word in bls.chat(model, question, adapter="facts", temperature=0, max_length=24)
    assert word not in bls.chat(model, question, temperature=0, max_length=24)
