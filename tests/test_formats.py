"""Finetune formats and parameters: pure unit tests (no Ray, no Spark), plus the real SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys

import pytest

from byzerllm_spark.errors import ConfigError
from byzerllm_spark.finetune.config import DEFAULT_QLORA_CONFIG, JobSpec, SfftConfig, SftConfig
from byzerllm_spark.finetune.formats import (
    IGNORE_INDEX,
    FormatError,
    detect_format,
    normalise,
    training_example,
    training_text,
)

ALPACA = {"instruction": "Name the dragon.", "input": "", "output": "Quimberly",
          "history": [["Who is Zorblat?", "A wizard."]]}
MOSS = {"conversation": [{"human": "Who is Zorblat?", "assistant": "A wizard."},
                         {"human": "Name the dragon.", "assistant": "Quimberly"}]}
OPENAI = {"messages": [{"role": "user", "content": "Who is Zorblat?"}, {"role": "assistant", "content": "A wizard."},
                       {"role": "user", "content": "Name the dragon."}, {"role": "assistant", "content": "Quimberly"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Who is Zorblat?"}, {"from": "gpt", "value": "A wizard."},
                              {"from": "human", "value": "Name the dragon."}, {"from": "gpt", "value": "Quimberly"}]}


def test_detect_format_from_columns():
    assert detect_format(["instruction", "input", "output", "history"]) == "alpaca"
    assert detect_format(["category", "conversation", "conversation_id", "dataset"]) == "moss"  # seed 003's schema
    assert detect_format(["messages", "id"]) == "openai"
    assert detect_format(["conversations"]) == "sharegpt"
    assert detect_format(["conversation", "instruction", "output"], "alpaca") == "alpaca"  # named wins


def test_detect_format_errors_name_the_expected_columns():
    with pytest.raises(FormatError, match="no recognised columns.*alpaca: instruction, output.*moss: conversation"):
        detect_format(["question", "answer"])
    with pytest.raises(FormatError, match="needs the columns conversation"):
        detect_format(["instruction", "output"], "moss")
    with pytest.raises(FormatError, match="not known"):
        detect_format(["x"], "llama")


def test_all_formats_normalise_to_the_same_turns():
    expected = normalise(OPENAI, "openai")
    assert normalise(ALPACA, "alpaca") == expected
    assert normalise(MOSS, "moss") == expected
    assert normalise(SHAREGPT, "sharegpt") == expected


def test_alpaca_input_and_json_history():
    turns = normalise({"instruction": "Translate", "input": "bonjour", "output": "hello",
                       "history": '[["a", "b"]]'}, "alpaca")
    assert turns[-2] == {"role": "user", "content": "Translate\nbonjour"}
    assert turns[0] == {"role": "user", "content": "a"}


@pytest.mark.parametrize("row, fmt, fragment", [
    ({"instruction": "q", "output": None}, "alpaca", "output is null"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "alpaca", "history\\[0\\] is not"),
    ({"conversation": []}, "moss", "conversation is empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "openai", "role is 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "openai", "no assistant turn"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "from is 'alien'"),
])
def test_bad_rows_name_the_problem_the_columns_and_the_row(row, fmt, fragment):
    with pytest.raises(FormatError, match=fragment) as info:
        normalise(row, fmt)
    assert f"The {fmt} format needs" in str(info.value)


def test_sft_typed_keys_override_the_seed_defaults():
    config = SftConfig.parse({"sft.int.max_seq_length": "512", "sft.float.learning_rate": "2e-4",
                              "sft.list.target_modules": '["q_proj", "v_proj"]', "sft.int.max_grad_norm": "1",
                              "other.key": "ignored"})
    assert config["max_seq_length"] == 512 and config["learning_rate"] == 2e-4
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["lora_rank"] == DEFAULT_QLORA_CONFIG["lora_rank"] == 64
    assert config["max_grad_norm"] == 1.0 and isinstance(config["max_grad_norm"], float)
    assert pickle.loads(pickle.dumps(config)) == config  # configs travel to the job


@pytest.mark.parametrize("params, fragment", [
    ({"sft.int.max_seq_length": "big"}, "sft.int.max_seq_length.*'big'.*integer"),
    ({"sft.str.max_seq_length": "512"}, "wrong type.*sft.int.max_seq_length"),
    ({"sft.int.max_seq_lenght": "512"}, "not a known sft parameter.*max_seq_length"),
    ({"sft.max_seq_length": "512"}, "not a valid typed key"),
    ({"sft.int.max_seq_length": "0"}, "use a number > 0"),
    ({"sfft.int.max_length": "128"}, "is a sfft key"),
])
def test_bad_sft_keys_fail_with_the_key_and_the_fix(params, fragment):
    with pytest.raises(ConfigError, match=fragment):
        SftConfig.parse(params)


def test_sfft_config_and_deepspeed_json():
    config = SfftConfig.parse({"sfft.int.max_length": "128", "sfft.bool.setup_nccl_socket_ifname_by_ip": "true"},
                              '{"train_micro_batch_size_per_gpu": 1}')
    assert config["max_length"] == 128 and config["setup_nccl_socket_ifname_by_ip"] is True
    assert config.deepspeed == {"train_micro_batch_size_per_gpu": 1}
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(ConfigError, match="deepspeedConfig is not valid JSON"):
        SfftConfig.parse({}, "{not json")
    with pytest.raises(ConfigError, match="not a known sfft parameter"):
        SfftConfig.parse({"sfft.int.max_lenght": "1"})


def test_configs_have_real_fields_and_one_set_of_defaults():
    config = SftConfig(max_seq_length=512, target_modules='["q_proj"]')
    assert config.max_seq_length == 512 and config.target_modules == ["q_proj"]
    assert SftConfig().lora_rank == DEFAULT_QLORA_CONFIG["lora_rank"] and SftConfig().disable_tqdm is True
    assert SftConfig.parse({}) == SftConfig()
    assert SfftConfig.parse({}) == SfftConfig() and SfftConfig().max_length == 1024
    with pytest.raises(ConfigError, match="max_seq_length=0 is not valid: use a number > 0"):
        SftConfig(max_seq_length=0)
    with pytest.raises(ConfigError, match="quantization='8bit'"):
        SftConfig(quantization="8bit")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_seq_length = 1  # type: ignore[misc]
    with pytest.raises(KeyError):
        config["no_such_key"]


def test_training_arguments_keys_pass_through_and_are_remembered():
    pytest.importorskip("transformers")
    config = SftConfig.parse({"sft.int.eval_steps": "7", "sft.float.weight_decay": "0.01"})
    assert config.training_args == {"eval_steps": 7} and config.weight_decay == 0.01
    assert config.user_keys == ("eval_steps", "weight_decay")


def _spec(**changes):
    values = dict(job_id="sft-x-20260101-000000-abcd1234", kind="sft", output="/tmp/jobs/sft-x",
                  config=SftConfig.parse({"sft.int.max_seq_length": "256"}), model_path=None, num_gpus=0,
                  num_workers=1, cpus_per_worker=2, detached=True, keep_partition_num=False, plugin=None,
                  format="alpaca", train_params={"sft.int.max_seq_length": "256"}, sys_conf={"k": "v"},
                  data_server_host=None)
    values.update(changes)
    return JobSpec(**values)


def test_configs_and_job_spec_pickle_and_round_trip_through_json():
    from byzerllm_spark.finetune.data_servers import DataServers

    data = DataServers(names=["byzerllm-data-x-0"], token="secret-token", rows=4, partitions=2, bytes=100,
                       set_id="s1")
    sfft = SfftConfig.parse({"sfft.int.max_length": "64", "sfft.bool.keep_checkpoints": "true"},
                            {"train_batch_size": 2, "zero_optimization": {"stage": 1}})
    for config in (SftConfig.parse({"sft.list.target_modules": '["q_proj"]'}), sfft):
        assert pickle.loads(pickle.dumps(config)) == config
        assert type(config).from_json(json.loads(json.dumps(config.to_json()))) == config
    specs = [_spec(), _spec(kind="sfft", config=sfft, num_workers=2, format=None, resume=True, resumes="sfft-y")]
    for spec in specs:
        spec = spec.replace(data=DataServers.from_json(data.to_json()))
        assert pickle.loads(pickle.dumps(spec)) == spec
        text = json.dumps(spec.to_json())
        assert "secret-token" not in text  # the push token never reaches the key-value store
        assert JobSpec.from_json(json.loads(text)) == spec
    assert specs[0].num_gpus == 0.0 and isinstance(specs[0].cpus_per_worker, float)


@pytest.mark.parametrize("changes, fragment", [
    ({"num_workers": 0}, "num_workers=0"),
    ({"cpus_per_worker": 0}, "cpus_per_worker=0"),
    ({"kind": "sfft"}, "a sfft job takes a SfftConfig"),
    ({"output": "relative/dir"}, "output='relative/dir'"),
    ({"kind": "sfft", "num_workers": 2, "config": SfftConfig(per_device_train_batch_size=2,
                                                            deepspeed={"train_batch_size": 8})},
     "train_batch_size=8 disagrees.*needs train_batch_size=4"),
])
def test_job_spec_checks_its_fields(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _spec(**changes)


def test_job_ids_and_default_folders(monkeypatch, tmp_path):
    from byzerllm_spark import settings
    from byzerllm_spark.finetune import jobs

    assert jobs.new_job_id("sft", "x").startswith("sft-x-")
    assert jobs.new_job_id("sft", "sft-x").startswith("sft-x-")  # not sft-sft-x-
    assert jobs.new_job_id("sfft", "sft-x").startswith("sfft-sft-x-")
    monkeypatch.setenv("BYZERLLM_HOME", str(tmp_path))
    monkeypatch.delenv("BYZERLLM_CACHE_DIR", raising=False)
    assert settings.jobs_dir() == str(tmp_path / "jobs") and settings.cache_dir() == str(tmp_path / "cache")
    assert jobs.job_dir(None, "sft-x") == str(tmp_path / "jobs" / "sft-x")
    monkeypatch.setenv("BYZERLLM_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert settings.cache_dir() == str(tmp_path / "elsewhere")


def test_job_logs_lose_ray_colour_codes():
    from byzerllm_spark.finetune.jobs import strip_ansi

    line = "\x1b[36m(RayTrainWorker pid=4242)\x1b[0m [byzerllm sfft-x] step 3/6 loss 2.1\x1b[1m\x1b[32m ok\x1b[0m"
    assert strip_ansi(line) == "(RayTrainWorker pid=4242) [byzerllm sfft-x] step 3/6 loss 2.1 ok"


def test_importing_the_package_stays_light():
    code = ("import sys, byzerllm_spark as bls; bls.sft; bls.wait; import byzerllm_spark.finetune.formats; "
            "import byzerllm_spark.finetune.config; "
            "print([m for m in ('torch', 'transformers', 'peft', 'ray', 'pyspark') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    from byzerllm_spark.finetune._model import hf_base_dir

    import transformers

    return transformers.AutoTokenizer.from_pretrained(hf_base_dir(None))


@pytest.mark.slow
def test_moss_and_alpaca_give_the_same_training_text(tokenizer):
    alpaca, moss = normalise(ALPACA, "alpaca"), normalise(MOSS, "moss")
    assert training_text(tokenizer, alpaca) == training_text(tokenizer, moss)
    assert training_example(tokenizer, alpaca, 256) == training_example(tokenizer, moss, 256)


@pytest.mark.slow
def test_loss_only_on_assistant_turns(tokenizer):
    turns = normalise(OPENAI, "openai")
    example = training_example(tokenizer, turns, 256)
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    text = tokenizer.decode(learned)
    assert "A wizard." in text and "Quimberly" in text and "<|im_end|>" in text
    assert "Who is Zorblat" not in text and "Name the dragon" not in text and "SmolLM" not in text
    # truncation keeps the length bound
    assert len(training_example(tokenizer, turns, 16)["input_ids"]) == 16


def test_public_functions_are_not_shadowed_by_submodules():
    """``bls.sft`` stays the function even after the trainer modules are imported."""
    code = ("import byzerllm_spark as bls, byzerllm_spark.finetune._sft, byzerllm_spark.finetune._sfft, "
            "byzerllm_spark.finetune.jobs; print(callable(bls.sft) and callable(bls.sfft) and callable(bls.wait))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
