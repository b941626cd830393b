"""Finetune configuration, parsed once on the driver into frozen, picklable dataclasses.

Byzer-LLM passes training parameters as typed string keys (its finetune docs:
``sft.int.max_seq_length="512"``): ``sft.<type>.<name>`` keys set :class:`SftConfig` fields,
``sfft.<type>.<name>`` keys set :class:`SfftConfig` fields. A key whose name is unknown, whose type
does not match the field, or whose value does not parse or is out of range fails here, on the
driver, before any data moves. The field defaults below are the only defaults; every later layer
reads the fields. A job is described by a :class:`JobSpec` holding the parsed config; it goes to
the cluster's key-value store as JSON (:meth:`JobSpec.to_json`) and to Ray tasks by pickle.

``SftConfig`` starts from Byzer-LLM's ``DEFAULT_QLORA_CONFIG`` (:data:`DEFAULT_QLORA_CONFIG` lists
its keys with the values used here), adapted where Byzer-LLM's values assume a CUDA GPU with
bitsandbytes and datasets of thousands of rows:

- ``optim='paged_adamw_32bit'`` needs bitsandbytes on CUDA; elsewhere ``adamw_torch`` is used.
- ``fp16=True`` applies on CUDA only (bf16 where the GPU supports it); CPU trains in fp32.
- ``warmup_steps=3000`` is capped at ``warmup_ratio_cap`` (10%) of the run's optimizer steps unless
  set: a warmup longer than the run never reaches the learning rate.
- ``logging_steps=300`` is capped at a tenth of the run (at least 1) unless set, so TensorBoard
  gets points.
- ``disable_tqdm`` is True (Byzer-LLM: False): a job's log is a file, where progress bars are noise;
  progress is reported by ``job_status`` / ``wait`` instead (step, total, loss, ETA).
- ``lora_rank/lora_alpha/lora_dropout`` map to peft's ``r/lora_alpha/lora_dropout``; Byzer-LLM
  does not name target modules: ``target_modules`` defaults to ``all-linear`` (as QLoRA does).
- ``save_steps/save_total_limit/save_strategy`` keep their meaning; checkpoints go to
  ``<output>/checkpoints`` and are removed when the job succeeds (``keep_checkpoints`` keeps them).

Any other ``transformers.TrainingArguments`` field is accepted as an ``sft.<type>.<name>`` key and
passed through unchanged (:attr:`SftConfig.training_args`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from ..config import parse_typed, split_typed_key
from ..errors import ConfigError, bad_value, check_int

if TYPE_CHECKING:
    from .data_servers import DataServers

#: Names whose values must be > 0, and >= 0 (both configs).
_POSITIVE = frozenset({"max_seq_length", "max_length", "per_device_train_batch_size", "gradient_accumulation_steps",
                       "lora_rank", "save_total_limit"})
_NON_NEGATIVE = frozenset({"learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "lora_dropout",
                           "num_train_epochs", "dataloader_num_workers", "logging_steps", "save_steps",
                           "warmup_ratio_cap"})
QUANTIZATION_CHOICES = ("auto", "none", "4bit")


def _type_of(value: Any) -> str:
    """The typed-key type (``int``, ``float``, ...) of a field, from its default."""
    for python_type, name in ((bool, "bool"), (int, "int"), (float, "float"), ((list, tuple), "list"), (dict, "dict")):
        if isinstance(value, python_type):
            return name
    return "str"


def _accepts(field_type: str, type_name: str) -> bool:
    # An int for a float field (sft.int.max_grad_norm=1); a list for a str field (target_modules).
    return field_type == type_name or (field_type, type_name) in (("float", "int"), ("str", "list"))


def _check_range(label: str, name: str, value: Any) -> None:
    """ConfigError naming ``label`` (the typed key, or the field) when ``value`` is out of range."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in _POSITIVE and (not numeric or value <= 0):
        raise ConfigError(bad_value(label, value, "use a number > 0"))
    if name in _NON_NEGATIVE and (not numeric or value < 0):
        raise ConfigError(bad_value(label, value, "use a number >= 0"))
    if name == "lora_dropout" and value >= 1:
        raise ConfigError(bad_value(label, value, "use a dropout in [0, 1)"))
    if name == "quantization" and value not in QUANTIZATION_CHOICES:
        raise ConfigError(bad_value(label, value, f"use one of {', '.join(map(repr, QUANTIZATION_CHOICES))}"))


def _training_argument_names() -> set[str] | None:
    """Names of ``transformers.TrainingArguments`` fields, when transformers is importable."""
    try:
        from transformers import TrainingArguments
    except Exception:  # the driver may not have transformers: such keys are refused here
        return None
    return {f.name for f in dataclasses.fields(TrainingArguments)}


class _TypedKeys:
    """Parsing of ``<PREFIX>.<type>.<name>`` keys into the fields of a frozen dataclass."""

    PREFIX: ClassVar[str]
    #: Fields that are not typed keys (set otherwise, or derived).
    _NOT_KEYS: ClassVar[frozenset[str]] = frozenset()
    #: Whether unknown names may be ``transformers.TrainingArguments`` fields.
    _PASSTHROUGH: ClassVar[bool] = False

    @classmethod
    def key_names(cls) -> list[str]:
        """The names accepted as ``<prefix>.<type>.<name>`` keys (besides pass-through ones)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls._NOT_KEYS]  # type: ignore[arg-type]

    @classmethod
    def _parse_keys(cls, params: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(field values, pass-through values)`` from the ``<prefix>.*`` keys of ``params``.

        Keys of other prefixes are ignored (they belong to other layers, or to a plugin), except
        the other training prefix, which is a mistake.
        """
        prefix = cls.PREFIX
        other = "sfft" if prefix == "sft" else "sft"
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        names = set(cls.key_names())
        values: dict[str, Any] = {}
        passthrough: dict[str, Any] = {}
        allowed_extra: set[str] | None = None
        for key, value in (params or {}).items():
            if not isinstance(key, str):
                raise ConfigError(f"params key {key!r} is not valid: keys are strings such as "
                                  f"'{prefix}.int.max_seq_length'")
            if key.startswith(other + "."):
                raise ConfigError(f"{key!r} is a {other} key, but this is a {prefix} job: use '{prefix}.<type>.<name>'")
            if not key.startswith(prefix + "."):
                continue
            type_name, name = split_typed_key(key, prefix)
            typed = parse_typed(key, type_name, value)
            if name in names:
                kind = _type_of(defaults[name])
                if not _accepts(kind, type_name):
                    raise ConfigError(f"{key!r} has the wrong type: {name} takes {kind} values, so write "
                                      f"'{prefix}.{kind}.{name}'")
                if kind == "float":
                    typed = float(typed)
                _check_range(key, name, typed)
                values[name] = typed
                continue
            if cls._PASSTHROUGH and allowed_extra is None:
                allowed_extra = _training_argument_names()  # imports transformers: only when needed
            if not allowed_extra or name not in allowed_extra:
                raise ConfigError(
                    f"{key!r} is not a known {prefix} parameter: valid names are {', '.join(sorted(names))}"
                    + (" and any transformers.TrainingArguments field" if cls._PASSTHROUGH else ""))
            passthrough[name] = typed
        return values, passthrough

    def _check_fields(self) -> None:
        for name in self.key_names():
            _check_range(name, name, getattr(self, name))

    def __getitem__(self, name: str) -> Any:
        """``config["max_seq_length"]``: a field by name (as Byzer-LLM's config dicts are read)."""
        if name not in self.key_names():
            raise KeyError(name)
        return getattr(self, name)

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-serialisable dict; :meth:`from_json` gives the config back."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        """The config that :meth:`to_json` gave ``data`` for (validated again)."""
        return cls(**data)


@dataclass(frozen=True)
class SftConfig(_TypedKeys):
    """Supervised finetuning (LoRA / QLoRA) settings: ``sft.<type>.<name>`` keys.

    The first block of fields is Byzer-LLM's ``DEFAULT_QLORA_CONFIG`` (adapted as the module
    docstring says); the second is this library's.

    Example:
        >>> SftConfig.parse({"sft.int.max_seq_length": "512"}).max_seq_length
        512
    """

    PREFIX: ClassVar[str] = "sft"
    _NOT_KEYS: ClassVar[frozenset[str]] = frozenset({"training_args", "user_keys"})
    _PASSTHROUGH: ClassVar[bool] = True

    num_train_epochs: int = 1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 16
    learning_rate: float = 0.0002
    max_seq_length: int = 1024
    logging_steps: int = 300
    save_steps: int = 500
    save_total_limit: int = 1
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 3000
    lora_rank: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    gradient_checkpointing: bool = False
    disable_tqdm: bool = True
    optim: str = "paged_adamw_32bit"
    seed: int = 42
    fp16: bool = True
    report_to: Any = "tensorboard"  # a name or a list of names
    dataloader_num_workers: int = 0
    save_strategy: str = "steps"
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    remove_unused_columns: bool = False

    #: ``all-linear`` or a list of module names (``sft.list.target_modules='["q_proj","v_proj"]'``).
    target_modules: Any = "all-linear"
    #: ``auto``: 4-bit QLoRA where CUDA and bitsandbytes exist; ``none``; ``4bit`` (fails without them).
    quantization: str = "auto"
    max_steps: int = -1
    warmup_ratio_cap: float = 0.1
    #: Write ``<output>/final`` with the adapter merged into the base weights.
    merge: bool = True
    #: A system message added to conversations that have none.
    system_msg: str = ""
    #: Keep ``<output>/checkpoints`` (optimizer state included) after the job succeeds.
    keep_checkpoints: bool = False
    #: Other ``transformers.TrainingArguments`` fields, passed through as given.
    training_args: dict[str, Any] = field(default_factory=dict)
    #: Names the caller set: adaptations such as the warmup cap apply only to the others.
    user_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str) and targets.lstrip().startswith("["):
            try:
                targets = json.loads(targets)
            except json.JSONDecodeError:
                raise ConfigError(bad_value("target_modules", targets, 'use a JSON list such as \'["q_proj"]\' or '
                                            "a name such as 'all-linear'")) from None
        if isinstance(targets, tuple):
            targets = list(targets)
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "user_keys", tuple(self.user_keys))
        object.__setattr__(self, "training_args", dict(self.training_args))
        self._check_fields()

    @classmethod
    def parse(cls, params: Mapping[str, Any] | None) -> "SftConfig":
        """Parse ``sft.*`` keys over the defaults.

        Raises:
            ConfigError: a key is malformed, unknown (listing the valid names), of the wrong type
                or out of range.

        Example:
            >>> SftConfig.parse({"sft.int.max_seq_length": "512"})["max_seq_length"]
            512
        """
        values, passthrough = cls._parse_keys(params)
        return cls(**values, training_args=passthrough, user_keys=tuple(sorted({**values, **passthrough})))


@dataclass(frozen=True)
class SfftConfig(_TypedKeys):
    """Continued pretraining settings (``sfft.<type>.<name>`` keys) and the DeepSpeed config.

    ``max_length`` is Byzer-LLM's ``sfft.int.max_length``. ``deepspeed`` is its ``deepspeedConfig``
    (a dict, or JSON text turned into one).

    Example:
        >>> SfftConfig.parse({"sfft.int.max_length": "128"}).max_length
        128
    """

    PREFIX: ClassVar[str] = "sfft"
    _NOT_KEYS: ClassVar[frozenset[str]] = frozenset({"deepspeed"})

    max_length: int = 1024
    num_train_epochs: int = 1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    seed: int = 42
    #: Optimizer steps per epoch; -1: one pass over the smallest worker's shard.
    steps_per_epoch: int = -1
    #: Checkpoints carry the optimizer, so a resumed run continues exactly.
    save_optimizer: bool = True
    setup_nccl_socket_ifname_by_ip: bool = False
    #: The text column; "": a column named text or content, or the table's only string column.
    text_column: str = ""
    logging_steps: int = 1
    #: Keep the epoch checkpoints (optimizer state included) after the job succeeds.
    keep_checkpoints: bool = False
    deepspeed: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        ds = self.deepspeed
        if isinstance(ds, str):
            if not ds.strip():
                ds = None
            else:
                try:
                    ds = json.loads(ds)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"deepspeedConfig is not valid JSON ({exc}): pass a DeepSpeed config object "
                                      "as JSON text or a dict") from None
        if ds is not None and not isinstance(ds, dict):
            raise ConfigError(bad_value("deepspeedConfig", self.deepspeed, "pass a JSON object (text or dict)"))
        object.__setattr__(self, "deepspeed", ds)
        self._check_fields()

    @classmethod
    def parse(cls, params: Mapping[str, Any] | None, deepspeed_config: Any = None) -> "SfftConfig":
        """Parse ``sfft.*`` keys over the defaults, with the DeepSpeed config (JSON text or dict).

        Raises:
            ConfigError: a bad key (as for :meth:`SftConfig.parse`), or a deepspeedConfig that is
                not a JSON object.
        """
        values, _ = cls._parse_keys(params)
        return cls(**values, deepspeed=deepspeed_config)

    def check_workers(self, num_workers: int) -> None:
        """DeepSpeed's batch keys must agree with the sfft keys that drive the training loop."""
        ds = self.deepspeed
        if not ds:
            return
        micro, accumulate = self.per_device_train_batch_size, self.gradient_accumulation_steps
        expected = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulate,
                    "train_batch_size": micro * accumulate * num_workers}
        for key, want in expected.items():
            if key in ds and str(ds[key]) != str(want):
                raise ConfigError(
                    f"deepspeedConfig {key}={ds[key]!r} disagrees with the sfft settings: per_device_train_batch_size "
                    f"{micro} x gradient_accumulation_steps {accumulate} x num_workers {num_workers} needs "
                    f"{key}={want} (set it so, leave it out, or change the sfft.int.* keys)")


#: Byzer-LLM's ``DEFAULT_QLORA_CONFIG`` keys (the SftConfig fields before ``target_modules``, the
#: first of this library's), with the values used here.
_SFT_NAMES = SftConfig.key_names()
DEFAULT_QLORA_CONFIG: dict[str, Any] = {
    name: getattr(SftConfig(), name) for name in _SFT_NAMES[:_SFT_NAMES.index("target_modules")]
}
#: The continued pretraining (sfft) keys and their defaults.
DEFAULT_SFFT_CONFIG: dict[str, Any] = {name: getattr(SfftConfig(), name) for name in SfftConfig.key_names()}

KINDS = {"sft": SftConfig, "sfft": SfftConfig}


@dataclass(frozen=True)
class JobSpec:
    """Everything a training job needs, fixed on the driver when it is submitted.

    Stored as JSON in the cluster's key-value store under the job id (any driver follows a job by
    its id), handed to Ray tasks by pickle. The public ``bls.sft``/``bls.sfft`` signatures hold
    the defaults of the resource fields; this class has none for them.

    Attributes:
        job_id: also the Ray Job submission id and the name of the output folder.
        kind: ``sft`` or ``sfft``.
        output: the job's directory (absolute): ``final/``, ``adapter/``, checkpoints...
        config: the parsed training settings (:class:`SftConfig` or :class:`SfftConfig`).
        model_path: the base model; None: the embedded SmolLM2.
        num_gpus, num_workers, cpus_per_worker: what the training reserves.
        detached: a Ray Job (True) or a Ray task the caller waits for.
        keep_partition_num: sfft workers read whole pushed partitions.
        plugin: a plugin module whose ``<kind>_train`` trains instead of the built-in trainer.
        format: the conversation format of an sft table.
        train_params: the caller's parameter map as given (a plugin's ``train_params``).
        sys_conf: a plugin's ``conf``.
        data_server_host: the address executors push to.
        data: the data servers holding the pushed table (set once the push is done).
        resume: continue from the newest checkpoint in ``output``.
        resumes: the id of the first job of a resumed chain.
    """

    job_id: str
    kind: str
    output: str
    config: SftConfig | SfftConfig
    model_path: str | None
    num_gpus: float
    num_workers: int
    cpus_per_worker: float
    detached: bool
    keep_partition_num: bool
    plugin: str | None
    format: str | None
    train_params: dict[str, Any]
    sys_conf: dict[str, Any]
    data_server_host: str | None
    data: "DataServers | None" = None
    resume: bool = False
    resumes: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(bad_value("kind", self.kind, "use 'sft' or 'sfft'"))
        if not isinstance(self.config, KINDS[self.kind]):
            raise ConfigError(bad_value("config", type(self.config).__name__,
                                        f"a {self.kind} job takes a {KINDS[self.kind].__name__}"))
        for param, minimum in (("num_gpus", 0), ("cpus_per_worker", 0.001)):
            value = getattr(self, param)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
                raise ConfigError(bad_value(param, value, f"use a number >= {minimum:g}"))
            object.__setattr__(self, param, float(value))
        check_int("num_workers", self.num_workers)
        if self.model_path is not None and not isinstance(self.model_path, str):
            raise ConfigError(bad_value("model_path", self.model_path, "pass a model directory or .gguf path, or None"))
        if not os.path.isabs(self.output):
            raise ConfigError(bad_value("output", self.output, "use an absolute path"))
        if isinstance(self.config, SfftConfig):
            self.config.check_workers(self.num_workers)
        object.__setattr__(self, "train_params", dict(self.train_params))
        object.__setattr__(self, "sys_conf", dict(self.sys_conf))

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the data servers' descriptor holds no push token)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["config"] = self.config.to_json()
        out["data"] = self.data.to_json() if self.data is not None else None
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "JobSpec":
        values = dict(data)
        values["config"] = KINDS[values["kind"]].from_json(values["config"])
        if values.get("data") is not None:
            from .data_servers import DataServers

            values["data"] = DataServers.from_json(values["data"])
        return cls(**values)

    def replace(self, **changes: Any) -> "JobSpec":
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)
