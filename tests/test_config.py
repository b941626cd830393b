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


# ---- Byzer-LLM's names, and keys checked against the backend before any worker starts ------------
DEPLOY_DEFAULTS = {"pretrained_model_type": "custom/auto", "model_path": None, "udf_name": None, "num_workers": 1,
                   "wait_ready_timeout": 300, "reconnect": False, "model_table": None}


def test_byzer_names_are_aliases_of_deploy_arguments():
    from byzerllm_spark.config import byzer_deploy_args

    # As Byzer-LLM's SQL passes them: every key of `run command as LLM` inside infer_params.
    byzer_sql = {"action": "infer", "pretrainedModelType": "custom/echo", "localModelDir": "/models/m",
                 "modelWaitServerReadyTimeout": "300", "udfName": "chat", "modelTable": "command",
                 "reconnect": "true", "echo_prefix": "> "}
    assert byzer_deploy_args({}, DEPLOY_DEFAULTS, {}, byzer_sql) == {
        "pretrained_model_type": "custom/echo", "model_path": "/models/m", "wait_ready_timeout": 300.0,
        "udf_name": "chat", "model_table": None, "reconnect": True}
    # As keyword arguments of deploy(); the same value under both names is fine.
    assert byzer_deploy_args({"udf_name": "chat"}, DEPLOY_DEFAULTS, {"udfName": "chat", "maxConcurrency": "2"},
                             None) == {"udf_name": "chat", "num_workers": 2}
    params = InferParams.parse(byzer_sql)
    assert params.plain == {"echo_prefix": "> "} and params.raw == byzer_sql  # plugins still get the whole map


@pytest.mark.parametrize(
    "given,kwargs,infer_params,needles",
    [
        ({"udf_name": "a"}, {"udfName": "b"}, None, ["udfName='b'", "udf_name='a'", "pass one of them"]),
        ({}, {"modelPath": "/a"}, {"localModelDir": "/b"}, ["localModelDir", "modelPath", "model_path"]),
        ({}, {"pretrainedModeltype": "x"}, None, ["no argument 'pretrainedModeltype'", "'pretrainedModelType'"]),
        ({}, {"num_worker": 2}, None, ["did you mean 'num_workers'"]),
        ({}, {}, {"reconnect": "maybe"}, ["infer_params['reconnect']='maybe'"]),
        ({}, {}, {"action": "finetune"}, ["bls.sft"]),
    ],
)
def test_byzer_names_conflicts_and_typos_name_both(given, kwargs, infer_params, needles):
    from byzerllm_spark.config import byzer_deploy_args

    with pytest.raises(ConfigError) as err:
        byzer_deploy_args(given, {**DEPLOY_DEFAULTS, "num_workers": 1}, kwargs, infer_params)
    for needle in needles:
        assert needle in str(err.value)


def test_deploy_takes_byzer_names_before_starting_anything():
    """deploy() parses Byzer-LLM's names and refuses conflicts before it touches Ray."""
    import byzerllm_spark as bls

    with pytest.raises(ConfigError, match="udfName='b' and udf_name='a'"):
        bls.deploy("m", udf_name="a", udfName="b")
    with pytest.raises(ConfigError, match="infer_backend='transformers'.*Valid keys: backend.<name> for"):
        bls.deploy("m", inferBackend="transformers", infer_params={"n_ctx": "512"})
    with pytest.raises(ConfigError, match="did you mean 'pretrained_model_type'"):
        bls.deploy("m", pretrained_model_typ="custom/echo")


def _config(**kwargs):
    params = kwargs.pop("infer_params", {})
    return DeployConfig(model="m", infer_params=InferParams.parse(params), **kwargs)


@pytest.mark.parametrize(
    "kwargs,needles",
    [
        ({"infer_backend": "transformers", "infer_params": {"n_gpu_layers": "-1"}},
         ["'n_gpu_layers' is not used by infer_backend='transformers'", "torch_dtype", "max_batch_size",
          "generation.<name>", "udfName"]),
        ({"infer_backend": "transformers", "infer_params": {"backend.torch_dtyp": "bfloat16"}},
         ["'backend.torch_dtyp'", "torch_dtype"]),
        ({"infer_backend": "embedding", "infer_params": {"saas.model": "x"}},
         ["'saas.model' configures saas/<vendor> types, not infer_backend='embedding'", "normalize"]),
        ({"pretrained_model_type": "saas/openai", "cpus_per_worker": 0.001,
          "infer_params": {"saas.model": "x", "n_ctx": "1"}}, ["'n_ctx' is not used by saas/openai", "saas.<name>"]),
    ],
)
def test_unknown_infer_params_keys_list_the_valid_ones(kwargs, needles):
    from byzerllm_spark.backends import registry

    with pytest.raises(ConfigError) as err:
        registry.check(_config(**kwargs))
    message = str(err.value)
    assert "\n" not in message  # one paragraph
    for needle in needles:
        assert needle in message


def test_llama_cpp_backend_keys_checked_against_its_signature():
    pytest.importorskip("llama_cpp")
    from byzerllm_spark.backends import registry

    assert registry.check(_config(infer_backend="llama_cpp", infer_params={"n_ctx": "1024",
                                                                          "backend.n_threads": "1"})) == "llama_cpp"
    with pytest.raises(ConfigError) as err:
        registry.check(_config(infer_backend="llama_cpp", infer_params={"backend.n_ctxx": "1"}))
    message = str(err.value)
    assert "'backend.n_ctxx' is not used by infer_backend='llama_cpp'" in message
    assert "n_ctx, " in message and "n_gpu_layers" in message and "\n" not in message and len(message) < 2000
    assert registry.check(_config(infer_backend="transformers",
                                  infer_params={"backend.torch_dtype": "float32", "backend.max_batch_size": "4"}))


def test_plugin_named_like_the_readme_gets_the_model_dir_byzer_gives(tmp_path, monkeypatch):
    """pretrained_model_type="my_llama" (a bare module name, as in Byzer-LLM) is a plugin; its init_model
    gets model_path, or None when the deployment names no model (never the built-in default model)."""
    from byzerllm_spark.backends import registry

    (tmp_path / "my_llama").mkdir()
    (tmp_path / "my_llama" / "__init__.py").write_text(
        "import types\n"
        "def init_model(model_dir, infer_params={}, sys_conf={}):\n"
        "    model = types.SimpleNamespace(model_dir=model_dir, infer_params=infer_params)\n"
        "    model.stream_chat = types.MethodType(lambda self, tok, ins, his=[], **kw: f'{self.model_dir}: {ins}', model)\n"
        "    return model, None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for kind in ("my_llama", "custom/my_llama"):
        config = _config(pretrained_model_type=kind, infer_params={"udfName": "chat", "anything": "goes"})
        assert registry.check(config) == "plugin:my_llama"
        backend = registry.build(config, "/where/the/default/model/lives")
        assert backend.model.model_dir is None
        assert backend.model.infer_params == {"udfName": "chat", "anything": "goes"}
    config = _config(pretrained_model_type="my_llama", model_path=str(tmp_path))
    assert registry.build(config, str(tmp_path)).model.model_dir == str(tmp_path)


def test_registry_and_plugin_loader_raise_tree_errors(tmp_path, monkeypatch):
    from byzerllm_spark.backends import registry
    from byzerllm_spark.errors import BackendNotFoundError

    with pytest.raises(ConfigError, match="already registered"):
        registry.register_infer_backend("transformers", "x:y")
    with pytest.raises(BackendNotFoundError, match="no plugin module 'no_such_plugin'.*custom/auto"):
        registry.check(_config(pretrained_model_type="no_such_plugin"))
    (tmp_path / "half_plugin.py").write_text("def init_model(model_dir, infer_params, sys_conf):\n    return object(), None\n")
    (tmp_path / "no_init.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendNotFoundError, match="has no init_model"):
        registry.check(_config(pretrained_model_type="no_init"))
    with pytest.raises(ConfigError, match="without stream_chat"):
        registry.build(_config(pretrained_model_type="half_plugin"), None)
    assert not hasattr(registry, "register_model_type")
