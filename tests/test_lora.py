"""Multi-LoRA, for real: two LoRA adapters trained with ``bls.sft(..., merge=False)`` on made-up facts (one fact
each, 8 optimizer steps: the fewest found to make each answer its fact at temperature 0; tests/_lora.py, trained once
per session and also served by tests/test_vllm.py), served with their base model (the embedded SmolLM2) by one
transformers deployment; rows of one SQL query pick their adapter.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

import byzerllm_spark as bls
from byzerllm_spark.errors import ConfigError
from _lora import FACTS, check_one_query_rows_pick_their_adapter

pytestmark = pytest.mark.slow

MODEL = "lora_base"


@pytest.fixture(scope="module")
def adapters(lora_adapters):
    """{name: adapter dir}: the session's two adapters (tests/_lora.py; vLLM's tests serve the same ones)."""
    return lora_adapters


@pytest.fixture(scope="module")
def lora_model(adapters, spark):
    bls.deploy(MODEL, infer_backend="transformers", lora_adapters=adapters, max_loras=3)
    bls.register_model_function(spark, MODEL, udf_name="lora_rows", fail_on_error=False)
    yield MODEL
    bls.undeploy(MODEL)


def test_sft_merge_false_leaves_an_adapter_that_deploys(adapters):
    for name, path in adapters.items():
        assert os.path.basename(path) == "adapter" and os.path.isfile(os.path.join(path, "adapter_config.json"))
        assert not os.path.exists(os.path.join(os.path.dirname(path), "final"))  # nothing merged


def test_one_query_rows_pick_their_adapter(lora_model, spark):
    """One SQL query, rows over both adapters, the base model and an unknown adapter (tests/_lora.py)."""
    check_one_query_rows_pick_their_adapter(spark, "lora_rows", MODEL)


def test_openai_model_names_the_adapter(lora_model):
    import openai

    client = openai.OpenAI(base_url=f"{bls.endpoint()}/v1", api_key="unused-on-loopback", max_retries=0)
    ids = {m.id for m in client.models.list().data}
    assert {MODEL, f"{MODEL}:facts", f"{MODEL}:lore"} <= ids
    question, _, word = FACTS["facts"]
    ask = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 24}
    answer = client.chat.completions.create(model=f"{MODEL}:facts", **ask)
    assert word in answer.choices[0].message.content and answer.model == f"{MODEL}:facts"
    assert word not in client.chat.completions.create(model=MODEL, **ask).choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="available: facts, lore"):
        client.chat.completions.create(model=f"{MODEL}:nope", **ask)


def test_add_adapter_later_and_its_errors(lora_model, adapters, tmp_path):
    """An adapter added to the running deployment answers; one trained for another base model (here: an adapter
    whose layers are 8 wide, against SmolLM2's 576) is refused by the worker's check, the one deploy runs,
    naming the weight that does not fit; names, paths and max_loras are checked."""
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(adapters["facts"], other)
    weights = load_file(str(other / "adapter_model.safetensors"))
    save_file({key: value.new_zeros(8, 8) for key, value in weights.items()}, str(other / "adapter_model.safetensors"))
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "tiny-llama"}))
    with pytest.raises(ConfigError, match=r"lora_adapters\['other'\]=.* does not fit this base model: its weight "
                                          r".*lora_[AB].weight \[8, 8\] was trained for another model \(tiny-llama\)"):
        bls.add_adapter(MODEL, "other", str(other))

    question, _, word = FACTS["lore"]
    table = str(tmp_path / "lore_table")  # an adapter kept as a model table deploys from the table
    bls.save_model_table(adapters["lore"], table)
    assert bls.add_adapter(MODEL, "lore2", table) == ["facts", "lore", "lore2"]
    assert word in bls.chat(MODEL, question, adapter="lore2", temperature=0, max_length=24)
    with pytest.raises(ConfigError, match="max_loras=3: model 'lora_base' already holds 3 adapters"):
        bls.add_adapter(MODEL, "more", adapters["facts"])
    with pytest.raises(ConfigError, match="name='facts' is already an adapter"):
        bls.add_adapter(MODEL, "facts", adapters["lore"])
    with pytest.raises(ConfigError, match="name='a:b' is not valid"):
        bls.add_adapter(MODEL, "a:b", adapters["lore"])
    with pytest.raises(ConfigError, match="is not a PEFT adapter directory"):
        bls.add_adapter(MODEL, "empty", str(tmp_path))


def test_lora_adapters_are_checked_before_any_worker_starts(cluster, tmp_path):
    from byzerllm_spark import cli

    with pytest.raises(ConfigError, match=r"lora_adapters\['facts'\]=.* is not a PEFT adapter directory"):
        bls.deploy("lora_bad", lora_adapters={"facts": str(tmp_path)})
    with pytest.raises(ConfigError, match="max_loras=1: raise max_loras"):
        bls.deploy("lora_bad", lora_adapters={"a": str(tmp_path), "b": str(tmp_path)}, max_loras=1)
    args = cli.build_parser().parse_args(["deploy", "--model", "m", "--ray_address", "127.0.0.1:1",
                                          "--lora_adapters", "facts=/a,", "tone"])
    with pytest.raises(ConfigError, match="--lora_adapters='facts=/a,,tone' is not valid: pass NAME=PATH pairs"):
        cli.COMMANDS["deploy"](args)  # before connecting
    with pytest.raises(ConfigError, match="lora_adapters: llama_cpp serves no LoRA adapters"):
        bls.deploy("lora_bad", infer_backend="llama_cpp", lora_adapters={"a": str(tmp_path)})
    assert not bls.exists("lora_bad")


def test_lora_settings_parse_once_and_pickle():
    """Pure: the forms lora_adapters takes, the errors that name the bad value, a config that travels."""
    import pickle

    from byzerllm_spark.config import DeployConfig, parse_lora_adapters
    from byzerllm_spark.errors import RequestParseError
    from byzerllm_spark.protocol.request import parse_request

    assert parse_lora_adapters("facts=/a, tone=/b") == parse_lora_adapters({"facts": "/a", "tone": "/b"})
    assert parse_lora_adapters(None) == {}
    with pytest.raises(ConfigError, match="'facts' is named twice"):
        parse_lora_adapters("facts=/a,facts=/b")
    with pytest.raises(ConfigError, match=r"lora_adapters\['x'\]=3 is not valid"):
        parse_lora_adapters({"x": 3})
    config = DeployConfig(model="base", lora_adapters="facts=/a,tone=/b", max_loras=2)
    assert pickle.loads(pickle.dumps(config)) == config and config.lora_adapters == {"facts": "/a", "tone": "/b"}
    with pytest.raises(ConfigError, match="max_loras=0 is not valid"):
        DeployConfig(model="base", max_loras=0)
    assert parse_request({"instruction": "q", "adapter": "facts"}).adapter == "facts"
    assert parse_request({"instruction": "q", "adapter": ""}).adapter is None  # the base model, as no key
    with pytest.raises(RequestParseError, match="adapter='<list of 1>' is not valid"):
        parse_request({"instruction": "q", "adapter": ["facts"]})


def test_vllm_lora_engine_arguments_fit_the_adapters(tmp_path):
    """Pure (no vLLM started): a vLLM worker turns LoRA on for deploy's adapters, with max_loras, and sizes
    vLLM's max_lora_rank (16 by default) to their rank (bls.sft's default rank is 64), unless backend.* says
    otherwise; a worker started without LoRA refuses an adapter saying how to deploy with it."""
    from byzerllm_spark.backends.vllm_backend import VllmBackend, engine_args
    from byzerllm_spark.config import DeployConfig, InferParams

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 64}}))
    args = engine_args(DeployConfig(model="b", infer_backend="vllm", lora_adapters={"a": str(tmp_path)}, max_loras=3))
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 3, 64)
    given = InferParams.parse({"backend.max_lora_rank": "128"})
    assert engine_args(DeployConfig(model="b", infer_backend="vllm", lora_adapters={"a": str(tmp_path)},
                                    infer_params=given))["max_lora_rank"] == 128
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    assert "max_lora_rank" not in engine_args(DeployConfig(model="b", infer_backend="vllm",
                                                           lora_adapters={"a": str(tmp_path)}))
    plain = engine_args(DeployConfig(model="b", infer_backend="vllm"))
    assert "enable_lora" not in plain and "max_loras" not in plain
    backend = VllmBackend.__new__(VllmBackend)  # its guard runs before any request to a server
    backend.served_name, backend.engine_args = "b", plain
    with pytest.raises(ConfigError, match="model 'b' serves no LoRA adapters: its vLLM server started without "
                                          "enable_lora .* backend.enable_lora=true"):
        backend.load_adapter("facts", str(tmp_path))
