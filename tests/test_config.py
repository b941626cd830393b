"""Pure unit tests of the configuration and request layers (nothing started)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest

from byzerllm_spark.config import DeployConfig, InferParams, parse_typed_params
from byzerllm_spark.errors import ConfigError
from byzerllm_spark.protocol.request import RequestParseError, parse_request


def test_infer_params_split_by_prefix():
    p = InferParams.parse(
        {"saas.model": "qwen-max", "backend.max_model_len": "28000", "generation.temperature": "0",
         "gen.top_k": "5", "n_gpu_layers": "-1", "verbose": "false", "backend.float.x": "0.5"}
    )
    assert p.saas == {"model": "qwen-max"}
    assert p.backend == {"max_model_len": 28000, "x": 0.5}
    assert p.generation == {"temperature": 0, "top_k": 5}
    assert p.plain == {"n_gpu_layers": -1, "verbose": False}


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("sft.int.max_seq_length", "abc", "sft.int.max_seq_length='abc'"),
        ("sft.integer.max_seq_length", "512", "int, float, bool, str, list, dict"),
        ("sft.max_seq_length", "512", "'sft.<type>.<name>'"),
        ("backend.int.n_ctx", "2k", "backend.int.n_ctx='2k'"),
        ("sfft.bool.x", "maybe", "'true' or 'false'"),
        ("sfft.dict.ds", "[1]", "JSON object"),
        ("saas.", "x", "has no name after its prefix"),
    ],
)
def test_mistyped_keys_name_key_value_and_form(key, value, needle):
    with pytest.raises(ConfigError) as err:
        InferParams.parse({key: value})
    assert needle in str(err.value)


def test_typed_keys_parse():
    out = parse_typed_params(
        {"sft.int.max_seq_length": "512", "sft.float.learning_rate": "2e-4", "sft.bool.fp16": "false",
         "sft.list.targets": '["q_proj"]', "sft.dict.extra": '{"a": 1}', "sft.str.name": "x", "other": "y"},
        "sft",
    )
    assert out == {"max_seq_length": 512, "learning_rate": 2e-4, "fp16": False, "targets": ["q_proj"],
                   "extra": {"a": 1}, "name": "x"}


def test_configs_pickle_and_hide_secrets():
    config = DeployConfig(model="kimi_chat", infer_params=InferParams.parse({"saas.api_key": "sk-SECRET-123"}))
    again = pickle.loads(pickle.dumps(config))
    assert again == config
    assert again.infer_params.saas["api_key"] == "sk-SECRET-123"
    assert "sk-SECRET-123" not in repr(config) and "sk-SECRET-123" not in str(config)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"model": "bad name"}, "model='bad name'"),
        ({"model": "m", "num_workers": 0}, "num_workers=0"),
        ({"model": "m", "cpus_per_worker": -1}, "cpus_per_worker=-1"),
        ({"model": "m", "load_balance": "random"}, "lru, round_robin"),
        ({"model": "m", "worker_concurrency": 1.5}, "worker_concurrency=1.5"),
        ({"model": "m", "udf_name": "my-udf"}, "udf_name='my-udf'"),
    ],
)
def test_deploy_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ConfigError) as err:
        DeployConfig(**kwargs)
    assert needle in str(err.value)


def test_request_parse_llm_param_strings():
    req = parse_request(json.dumps({
        "instruction": "hi", "temperature": "0.3", "max_length": "32", "top_p": "0.9",
        "system_msg": "be brief", "user_role": "User", "generation.image": "http://x/a.png",
        "history": json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    }))
    assert (req.temperature, req.max_length, req.top_p) == (0.3, 32, 0.9)
    assert req.generation == {"image": "http://x/a.png"}
    assert req.messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "hi"},
    ]


def test_request_messages_form():
    req = parse_request({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]})
    assert req.system_msg == "s" and req.instruction == "q2" and len(req.history) == 2


@pytest.mark.parametrize(
    "params,needle",
    [
        ({"instruction": "x", "temperature": "hot"}, "temperature='hot'"),
        ({"instruction": "x", "max_length": "-3"}, "max_length='-3'"),
        ({"instruction": "x", "top_p": 7}, "top_p=7"),
        ({"instruction": "x", "temprature": 0}, "unknown request key 'temprature'"),
        ({"temperature": 0}, "no 'instruction'"),
        ("not json", "not valid JSON"),
        ([1, 2], "pass a map"),
        ({"instruction": "x", "history": "[oops"}, "history="),
    ],
)
def test_request_errors_say_what_to_fix(params, needle):
    with pytest.raises(RequestParseError) as err:
        parse_request(params)
    assert needle in str(err.value)


def test_import_is_light():
    code = (
        "import sys, byzerllm_spark\n"
        "heavy = [m for m in ('torch', 'transformers', 'ray.serve', 'vllm', 'llama_cpp', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
