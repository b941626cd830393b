"""Finetune from Spark tables, as Byzer-LLM does (its finetune and model plugin docs).

A Spark table of conversations (Alpaca, Moss, OpenAI ``messages``, ShareGPT) or of raw text is
pushed by Spark's executors into data servers in Ray (:mod:`.data_servers`), then a training job
reads it as a ``ray.data.Dataset``: LoRA/QLoRA SFT (:mod:`._sft`) or continued pretraining on
several Ray Train workers (:mod:`._sfft`). The settings are parsed once, here, into a frozen
:class:`~.config.JobSpec` (:mod:`.config`) that the job reads. Jobs run detached as Ray Jobs (:mod:`.jobs`) with
status, logs, progress, cancel and resume; the output is a model directory ready for
``bls.deploy(model_path=bls.job_output(job))``.

Importing this package is light: Spark, Ray, torch, transformers and peft load when used.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from ..errors import ConfigError, bad_value
from .config import JobSpec, SfftConfig, SftConfig
from .formats import FormatError
from .jobs import (
    FinetuneJob,
    JobError,
    cancel_job,
    job_logs,
    job_output,
    job_status,
    list_jobs,
    resume_job,
    wait,
)

__all__ = [
    "FinetuneJob",
    "FormatError",
    "JobError",
    "JobSpec",
    "SfftConfig",
    "SftConfig",
    "cancel_job",
    "job_logs",
    "job_output",
    "job_status",
    "list_jobs",
    "resume_job",
    "sfft",
    "sft",
    "to_ray_dataset",
    "wait",
]


def to_ray_dataset(df: Any, **kwargs: Any):
    """A Spark DataFrame as a ``ray.data.Dataset`` through data servers; see :mod:`.data_servers`."""
    from .data_servers import to_ray_dataset as _to_ray_dataset

    return _to_ray_dataset(df, **kwargs)


def _check_df(df: Any) -> None:
    if not hasattr(df, "mapInArrow") or not hasattr(df, "columns"):
        raise ConfigError(bad_value("df", type(df).__name__, "pass a Spark DataFrame, e.g. spark.table('sft_data')"))


def _plugin_module(pretrained_model_type: str | None, kind: str) -> str | None:
    """The plugin module for ``custom/<module>`` types that define ``<kind>_train`` (Byzer-LLM's
    model plugin contract), or None for the built-in trainer."""
    if pretrained_model_type in (None, "custom/auto", f"{kind}/auto"):
        return None
    import importlib

    from ..backends.registry import plugin_module_name

    name = pretrained_model_type
    # Byzer-LLM's finetune docs name training types sft/<model> and sfft/<model>: the built-in trainer.
    if name.startswith(("sft/", "sfft/")):
        return None
    module_name = plugin_module_name(name)
    contract = f"{kind}_train(data_refs, train_params, conf)"
    if module_name is None:
        raise ConfigError(bad_value("pretrained_model_type", name, "use None, 'sft/<model>' (built-in trainer) or "
                                    f"'custom/<module>' with a {contract} function"))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"pretrained_model_type={name!r}: module {module_name!r} cannot be imported ({exc})") from None
    if not callable(getattr(module, f"{kind}_train", None)):
        raise ConfigError(f"pretrained_model_type={name!r}: module {module_name!r} has no {contract} (Byzer-LLM's "
                          "model plugin contract)")
    return module_name


def _parse_config(kind: str, params: Any, deepspeed_config: Any) -> SftConfig | SfftConfig:
    """The one parse of a job's training settings: typed keys, or a config object as it is."""
    config_cls = SftConfig if kind == "sft" else SfftConfig
    if isinstance(params, config_cls):
        if deepspeed_config is not None:
            return dataclasses.replace(params, deepspeed=deepspeed_config)
        return params
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(bad_value("params", type(params).__name__,
                                    f"pass a dict of '{kind}.<type>.<name>' keys or a {config_cls.__name__}"))
    if kind == "sft":
        return SftConfig.parse(params)
    return SfftConfig.parse(params, deepspeed_config)


def _prepare(kind: str, df: Any, *, model_path: str | None, output: str | None, name: str | None, params: Any,
             num_gpus: float, num_workers: int, cpus_per_worker: float, detached: bool, keep_partition_num: bool,
             pretrained_model_type: str | None, fmt: str | None, deepspeed_config: Any,
             sys_conf: Mapping[str, Any] | None, data_server_host: str | None) -> JobSpec:
    """Check everything that can be checked before data moves; the job's spec (not yet pushed)."""
    from .. import cluster
    from . import jobs
    from ._model import check_base_model

    _check_df(df)
    config = _parse_config(kind, params, deepspeed_config)
    job_id = jobs.new_job_id(kind, name)
    spec = JobSpec(
        job_id=job_id, kind=kind, output=jobs.job_dir(output, job_id),
        config=config, model_path=model_path, num_gpus=num_gpus, num_workers=num_workers,
        cpus_per_worker=cpus_per_worker, detached=bool(detached), keep_partition_num=bool(keep_partition_num),
        plugin=_plugin_module(pretrained_model_type, kind), format=fmt,
        train_params=dict(params) if isinstance(params, Mapping) else {}, sys_conf=dict(sys_conf or {}),
        data_server_host=data_server_host,
    )
    if isinstance(config, SfftConfig) and config.deepspeed is not None:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("deepspeedConfig needs DeepSpeed on the training nodes: pip install deepspeed "
                              "(or leave deepspeedConfig out to train with DDP)")
    info = cluster.ensure_init()
    if (info.embedded or model_path is None or os.path.exists(model_path)) and spec.plugin is None:
        check_base_model(model_path)
    jobs.check_resources(kind, spec.num_gpus, spec.num_workers, spec.cpus_per_worker)
    if detached:
        jobs.job_client()  # no job server: say so now, before any data moves
    return spec


def _push(spec: JobSpec, df: Any, transform) -> JobSpec:
    """Push ``df`` into the job's data servers; the spec with them."""
    from .data_servers import DataServers, push, release

    servers, summaries = push(df, name=f"byzerllm-data-{spec.job_id}", detached=spec.detached, transform=transform,
                              host=spec.data_server_host)
    bad = [s for s in summaries if s["error"]]
    if bad:
        release(servers)
        import json

        first = json.loads(bad[0]["error"])
        raise FormatError(f"partition {bad[0]['partition']}, row {first['row']}: {first['message']}")
    if servers.rows == 0:
        release(servers)
        raise ConfigError("the training table is empty: it has no rows to train on (check the query or filter "
                          "that built it)")
    return spec.replace(data=DataServers.from_json(servers.to_json()))  # the descriptor, without the push token


def sft(
    df: Any,
    model_path: str | None = None,
    *,
    output: str | None = None,
    name: str | None = None,
    params: Mapping[str, Any] | SftConfig | None = None,
    num_gpus: float = 0,
    cpus_per_worker: float = 1,
    detached: bool = True,
    format: str = "auto",
    keep_partition_num: bool = False,
    pretrained_model_type: str | None = None,
    sys_conf: Mapping[str, Any] | None = None,
    data_server_host: str | None = None,
    progress: bool = True,
    merge: bool | None = None,
) -> FinetuneJob:
    """Supervised finetuning (LoRA; QLoRA in 4-bit where CUDA and bitsandbytes exist) on a Spark table.

    Args:
        df: conversations in Alpaca, Moss, OpenAI ``messages`` or ShareGPT columns (see
            :mod:`.formats`); pushed by the executors into Ray, never collected on the driver.
        model_path: the base model, a Hugging Face directory or a GGUF file/directory; None: the
            embedded SmolLM2-135M-Instruct.
        output: the jobs folder (Byzer-LLM's ``localPathPrefix``); the job writes
            ``<output>/<job_id>``. Default ``settings.jobs_dir()``: ``~/.byzerllm_spark/jobs``
            (``$BYZERLLM_HOME/jobs``).
        name: a label in the job id ``sft-<name>-<time>-<uuid>`` (as Byzer-LLM names its training
            Actor); a name that already starts with ``sft-`` is used as it is.
        params: Byzer-LLM's typed keys, ``{"sft.int.max_seq_length": "512", ...}``, or an
            :class:`~.config.SftConfig` (see :mod:`.config` for the fields and adapted defaults).
        num_gpus: GPUs of the one machine that trains (0: CPU).
        cpus_per_worker: CPUs the training process reserves (and torch threads).
        detached: run as a Ray Job and return at once (needs the dashboard, see :mod:`.jobs`);
            False: train in a Ray task and return when done.
        format: ``auto`` (from the columns) or ``alpaca``/``moss``/``openai``/``sharegpt``.
        keep_partition_num: keep one data block per Spark partition (Byzer-LLM's ``keepPartitionNum``).
        pretrained_model_type: ``custom/<module>``: a plugin (Byzer-LLM's model plugin contract)
            whose ``sft_train(data_refs, train_params, conf)`` trains instead of the built-in trainer.
        data_server_host: the address executors push to (default: see :mod:`.data_servers`).
        progress: show a progress bar while waiting (detached=False).
        merge: True: write the adapter merged into the base weights (``final/``, a plain model to deploy);
            False: keep only the LoRA adapter (``adapter/``), to serve beside others over one base model
            with ``bls.deploy(..., lora_adapters={name: bls.job_output(job)})``. Default None: the
            ``sft.bool.merge`` key of ``params`` (default true).

    Returns:
        the FinetuneJob; ``bls.wait(job)``, then ``bls.job_output(job)`` is the merged model dir (the
        adapter dir with ``merge=False``).

    Raises:
        FormatError: no recognised columns, or a row that fits no format (named, with its columns).
        ConfigError: an empty table, a bad typed key, a model_path that is not a model.
        ResourceError: num_gpus or CPUs the cluster can never give.
        ClusterError: detached=True on a cluster without a job server.
        JobError: (detached=False) the training failed.

    Example:
        >>> job = bls.sft(spark.table("sft_data"), params={"sft.int.max_seq_length": "512"})  # doctest: +SKIP
        >>> bls.wait(job); bls.deploy("smol_ft", model_path=bls.job_output(job))  # doctest: +SKIP
    """
    from .formats import arrow_normaliser, detect_format, format_columns

    if merge is not None:
        if not isinstance(merge, bool):
            raise ConfigError(bad_value("merge", merge, "pass True (a merged model) or False (the LoRA adapter alone)"))
        if isinstance(params, SftConfig):
            params = dataclasses.replace(params, merge=merge)
        elif params is None or isinstance(params, Mapping):
            params = {**(params or {}), "sft.bool.merge": str(merge).lower()}
    spec = _prepare("sft", df, model_path=model_path, output=output, name=name, params=params, num_gpus=num_gpus,
                    num_workers=1, cpus_per_worker=cpus_per_worker, detached=detached,
                    keep_partition_num=keep_partition_num, pretrained_model_type=pretrained_model_type, fmt=format,
                    deepspeed_config=None, sys_conf=sys_conf, data_server_host=data_server_host)
    if spec.plugin:
        spec = _push(spec, df, None)  # a plugin gets the table's own columns (Byzer-LLM's plugin contract)
    else:
        fmt = detect_format(df.columns, format)
        spec = _push(spec.replace(format=fmt), df.select(*format_columns(fmt, df.columns)), arrow_normaliser(fmt))
    from .jobs import submit

    return submit(spec, progress=progress)


def sfft(
    df: Any,
    model_path: str | None = None,
    *,
    output: str | None = None,
    name: str | None = None,
    params: Mapping[str, Any] | SfftConfig | None = None,
    num_workers: int | None = None,
    num_gpus: float = 0,
    cpus_per_worker: float = 1,
    detached: bool = True,
    keep_partition_num: bool = False,
    deepspeed_config: Any = None,
    pretrained_model_type: str | None = None,
    sys_conf: Mapping[str, Any] | None = None,
    data_server_host: str | None = None,
    progress: bool = True,
) -> FinetuneJob:
    """Continued pretraining on raw text, on ``num_workers`` Ray Train workers (DDP; gloo on CPU).

    Args:
        df: a table with the text in ``sfft.str.text_column`` (default: a column named ``text`` or
            ``content``, else the only string column).
        num_workers: training workers; default ``num_gpus`` when GPUs are asked for, else 1.
        num_gpus: GPUs in all (Byzer-LLM: ``!byzerllm setup "num_gpus=12"``), split over the workers.
        cpus_per_worker: CPUs per worker (and its torch threads).
        keep_partition_num: workers read whole Spark partitions as they were (Byzer-LLM's
            ``keepPartitionNum``); otherwise Ray Data splits the rows evenly between workers.
        deepspeed_config: Byzer-LLM's ``deepspeedConfig`` (JSON text or dict); needs DeepSpeed.
        params: ``sfft.<type>.<name>`` keys, e.g. ``{"sfft.int.max_length": "128"}``, or an
            :class:`~.config.SfftConfig`.
        Other arguments: as for :func:`sft`.

    Returns:
        the FinetuneJob. Checkpoints are written every epoch; ``resume_job`` continues a stopped
        one; they are removed when the job succeeds (``sfft.bool.keep_checkpoints`` keeps them).

    Example:
        >>> job = bls.sfft(spark.table("raw_text"), num_workers=2, params={"sfft.int.max_length": "128"})  # doctest: +SKIP
    """
    if num_workers is None:
        num_workers = int(num_gpus) if num_gpus and float(num_gpus).is_integer() and num_gpus >= 1 else 1
    spec = _prepare("sfft", df, model_path=model_path, output=output, name=name, params=params, num_gpus=num_gpus,
                    num_workers=num_workers, cpus_per_worker=cpus_per_worker, detached=detached,
                    keep_partition_num=keep_partition_num, pretrained_model_type=pretrained_model_type, fmt=None,
                    deepspeed_config=deepspeed_config, sys_conf=sys_conf, data_server_host=data_server_host)
    if spec.plugin:
        spec = _push(spec, df, None)
    else:
        from pyspark.sql import functions as F

        column = _text_column(df, spec.config.text_column)
        text = df.select(F.col(column).cast("string").alias("text")).where(F.col("text").isNotNull() & (F.length("text") > 0))
        spec = _push(spec, text, None)
    from .jobs import submit

    return submit(spec, progress=progress)


def _text_column(df: Any, configured: str) -> str:
    columns = list(df.columns)
    if configured:
        if configured not in columns:
            raise FormatError(f"sfft.str.text_column={configured!r} is not a column of the table (its columns: "
                               f"{', '.join(columns) or 'none'})")
        return configured
    for candidate in ("text", "content"):
        if candidate in columns:
            return candidate
    strings = [f.name for f in df.schema.fields if f.dataType.typeName() == "string"]
    if len(strings) == 1:
        return strings[0]
    raise FormatError(
        "the pretraining table has no recognised text column (its columns: "
        f"{', '.join(columns) or 'none'}): expected a column named text or content, a single string column, "
        "or sfft.str.text_column naming one"
    )
