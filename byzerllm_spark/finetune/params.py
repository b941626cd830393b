"""Training parameters: seed 003's typed keys (``sft.int.max_seq_length``) → frozen configs.

``sft.<type>.<name>`` keys override :data:`DEFAULT_QLORA_CONFIG` (seed 003, adapted below);
``sfft.<type>.<name>`` keys override :data:`DEFAULT_SFFT_CONFIG`. A key whose name is unknown, whose
type does not match the parameter, or whose value does not parse fails here, on the driver,
before any data moves or any training starts.

Adapted from the seed's DEFAULT_QLORA_CONFIG, because the seed's values assume a CUDA GPU with
bitsandbytes and datasets of thousands of rows (see docs/finetune.md):

- ``optim='paged_adamw_32bit'`` needs bitsandbytes on CUDA; elsewhere ``adamw_torch`` is used.
- ``fp16=True`` applies on CUDA only (bf16 where the GPU supports it); CPU trains in fp32.
- ``warmup_steps=3000`` is capped at 10% of the run's optimizer steps: a warmup longer than the
  run never reaches the learning rate.
- ``logging_steps=300`` is capped at a tenth of the run (at least 1) so TensorBoard gets points.
- ``disable_tqdm`` defaults to True: a job's log is a file, where progress bars are noise; progress
  is reported by ``job_status`` / ``wait`` instead (step, total, loss, ETA).
- ``lora_rank/lora_alpha/lora_dropout`` map to peft's ``r/lora_alpha/lora_dropout``; the seed does
  not name target modules: ``target_modules`` defaults to ``all-linear`` (as QLoRA does).
- ``save_steps/save_total_limit/save_strategy`` keep their meaning; checkpoints go to
  ``<output>/checkpoints``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config import parse_typed, split_typed_key
from ..errors import ConfigError

#: Seed 003's defaults, unchanged; see the module docstring for how some are adapted.
DEFAULT_QLORA_CONFIG: dict[str, Any] = {
    "num_train_epochs": 1,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 16,
    "learning_rate": 0.0002,
    "max_seq_length": 1024,
    "logging_steps": 300,
    "save_steps": 500,
    "save_total_limit": 1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 3000,
    "lora_rank": 64,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "gradient_checkpointing": False,
    "disable_tqdm": False,
    "optim": "paged_adamw_32bit",
    "seed": 42,
    "fp16": True,
    "report_to": "tensorboard",
    "dataloader_num_workers": 0,
    "save_strategy": "steps",
    "weight_decay": 0,
    "max_grad_norm": 0.3,
    "remove_unused_columns": False,
}

#: Keys this library adds to the seed's list (same typed-key syntax).
SFT_EXTRA_DEFAULTS: dict[str, Any] = {
    "target_modules": "all-linear",  # or a JSON list: sft.list.target_modules='["q_proj","v_proj"]'
    "quantization": "auto",  # auto: 4-bit QLoRA where CUDA and bitsandbytes exist; "none" / "4bit"
    "max_steps": -1,
    "warmup_ratio_cap": 0.1,
    "merge": True,  # write <output>/final with the adapter merged into the base weights
    "system_msg": "",  # a system message added to conversations that have none
}

#: Continued pretraining (sfft) defaults. ``max_length`` is seed 001's ``sfft.int.max_length``.
DEFAULT_SFFT_CONFIG: dict[str, Any] = {
    "max_length": 1024,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-5,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "warmup_steps": 0,
    "seed": 42,
    "steps_per_epoch": -1,  # -1: one pass over the worker's shard
    "save_optimizer": True,  # checkpoints carry the optimizer so a resumed run continues exactly
    "setup_nccl_socket_ifname_by_ip": False,
    "text_column": "",  # "" : a column named text/content, or the table's only string column
    "logging_steps": 1,
}

def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return "str"


def _accepts(default: Any, type_name: str) -> bool:
    kind = _type_of(default)
    if kind == type_name:
        return True
    if kind == "float" and type_name == "int":
        return True  # sft.int.weight_decay=0 is a float parameter given as an integer
    if kind == "int" and type_name == "float":
        return False
    if kind == "str" and type_name == "list":
        return True  # target_modules: "all-linear" or a list
    return False


def _extra_training_args() -> set[str] | None:
    """Names of ``transformers.TrainingArguments`` fields, when transformers is importable."""
    try:
        import dataclasses

        from transformers import TrainingArguments
    except Exception:  # the driver may not have transformers; the job checks again
        return None
    return {f.name for f in dataclasses.fields(TrainingArguments)}


def parse_train_params(params: Mapping[str, Any] | None, prefix: str, defaults: Mapping[str, Any],
                       passthrough: set[str] | None = None) -> dict[str, Any]:
    """Merge typed ``<prefix>.<type>.<name>`` keys over ``defaults``.

    Keys of other prefixes are ignored (they belong to other layers: ``deepspeedConfig``, say).

    Raises:
        ConfigError: a key is malformed, unknown (listing the valid names) or of the wrong type.
    """
    out = dict(defaults)
    for key, value in (params or {}).items():
        if not isinstance(key, str):
            raise ConfigError(f"params key {key!r} is not valid: keys are strings such as '{prefix}.int.max_seq_length'")
        other = "sfft" if prefix == "sft" else "sft"
        if key.startswith(other + "."):
            raise ConfigError(f"{key!r} is a {other} key, but this is a {prefix} job: use '{prefix}.<type>.<name>'")
        if not key.startswith(prefix + "."):
            continue
        type_name, name = split_typed_key(key, prefix)
        typed = parse_typed(key, type_name, value)
        if name in defaults:
            default = defaults[name]
            if not _accepts(default, type_name):
                raise ConfigError(
                    f"{key!r} has the wrong type: {name} takes {_type_of(default)} values, so write "
                    f"'{prefix}.{_type_of(default)}.{name}'"
                )
            if _type_of(default) == "float" and type_name == "int":
                typed = float(typed)
        elif passthrough is None or name not in passthrough:
            valid = sorted(defaults)
            raise ConfigError(
                f"{key!r} is not a known {prefix} parameter: valid names are {', '.join(valid)}"
                + (" and any transformers.TrainingArguments field" if passthrough else "")
            )
        _check_range(key, name, typed)
        out[name] = typed
    return out


_POSITIVE = {"max_seq_length", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
             "lora_rank", "save_total_limit"}
_NON_NEGATIVE = {"learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "lora_dropout",
                 "num_train_epochs", "dataloader_num_workers", "logging_steps", "save_steps"}


def _check_range(key: str, name: str, value: Any) -> None:
    if name in _POSITIVE and (not isinstance(value, (int, float)) or value <= 0):
        raise ConfigError(f"{key}={value!r} is not valid: use a number > 0")
    if name in _NON_NEGATIVE and (not isinstance(value, (int, float)) or value < 0):
        raise ConfigError(f"{key}={value!r} is not valid: use a number >= 0")
    if name == "lora_dropout" and value >= 1:
        raise ConfigError(f"{key}={value!r} is not valid: use a dropout in [0, 1)")
    if name == "quantization" and value not in ("auto", "none", "4bit"):
        raise ConfigError(f"{key}={value!r} is not valid: use 'auto', 'none' or '4bit'")


@dataclass(frozen=True)
class SftConfig:
    """A parsed SFT configuration: the seed's keys plus this library's (see the module docstring)."""

    values: dict[str, Any] = field(default_factory=dict)
    #: names the caller set (adaptations such as the warmup cap apply only to the others)
    user_keys: tuple[str, ...] = ()

    @classmethod
    def parse(cls, params: Mapping[str, Any] | None) -> "SftConfig":
        """Parse ``sft.*`` keys over the defaults.

        Example:
            >>> SftConfig.parse({"sft.int.max_seq_length": "512"})["max_seq_length"]
            512
        """
        defaults = {**DEFAULT_QLORA_CONFIG, **SFT_EXTRA_DEFAULTS, "disable_tqdm": True}
        passthrough = _extra_training_args()
        values = parse_train_params(params, "sft", defaults, passthrough)
        targets = values["target_modules"]
        if isinstance(targets, str) and targets.startswith("["):
            values["target_modules"] = json.loads(targets)
        user = tuple(sorted(k.split(".", 2)[2] for k in (params or {}) if isinstance(k, str) and k.startswith("sft.")))
        return cls(values=values, user_keys=user)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


@dataclass(frozen=True)
class SfftConfig:
    """A parsed continued-pretraining configuration (``sfft.*`` keys) and the DeepSpeed config."""

    values: dict[str, Any] = field(default_factory=dict)
    deepspeed: dict[str, Any] | None = None

    @classmethod
    def parse(cls, params: Mapping[str, Any] | None, deepspeed_config: Any = None) -> "SfftConfig":
        values = parse_train_params(params, "sfft", DEFAULT_SFFT_CONFIG)
        ds = None
        if deepspeed_config not in (None, ""):
            if isinstance(deepspeed_config, str):
                try:
                    ds = json.loads(deepspeed_config)
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"deepspeedConfig is not valid JSON ({exc}): pass a DeepSpeed config object as JSON text or a dict"
                    ) from None
            else:
                ds = deepspeed_config
            if not isinstance(ds, dict):
                raise ConfigError(f"deepspeedConfig={deepspeed_config!r} is not valid: pass a JSON object")
        return cls(values=values, deepspeed=ds)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]
