"""The training job's entrypoint: ``python -m byzerllm_spark.finetune._entry <job_id> <gcs address>``.

Runs as a Ray Job's driver (``detached=True``) or inside a Ray task (``detached=False``). It reads
the job's spec (a :class:`~.config.JobSpec`) from the cluster's key-value store, the data from the
job's data servers, trains, and publishes progress and the result. On success the data servers and
the intermediate checkpoints are removed; after a failure or a stop they stay, so that
``resume_job`` can continue from the last checkpoint.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
from typing import Any

from ..errors import JobError
from ..settings import NAMESPACE
from . import _progress
from .config import JobSpec
from .data_servers import DataServers


def collect_from(data_refs: list[Any]):
    """Rows (dicts) of the pushed table: Byzer-LLM's ``RayContext.collect_from(data_refs)``.

    ``data_refs`` are object refs of Arrow tables, as given to a plugin's ``sft_train``.
    """
    import ray

    for ref in data_refs:
        table = ray.get(ref)
        yield from table.to_pylist()


def _conversations(dataset) -> list[list[dict[str, str]]]:
    out = []
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=4096):
        out.extend(batch.column("messages").to_pylist())
    return out


def run_job(job_id: str, address: str | None = None) -> dict[str, Any]:
    """Run one job to the end. Returns the result published under the job's key.

    Args:
        address: the cluster's GCS address. A Ray Job's driver gets ``RAY_ADDRESS=auto``, which
            picks any Ray instance on the machine when there are several; the submitter passes the
            exact one, and it is exported so that Ray Train's helper processes find it too.
    """
    import ray

    if not ray.is_initialized():
        if address:
            os.environ["RAY_ADDRESS"] = address
        ray.init(address=address or os.environ.get("RAY_ADDRESS", "auto"), namespace=NAMESPACE, log_to_driver=True)
    data = _progress.get(job_id, "spec")
    if data is None:
        raise JobError(f"job {job_id!r} has no spec in the cluster's key-value store: submit it with bls.sft/bls.sfft")
    spec = JobSpec.from_json(data)
    reporter = _progress.Reporter(job_id, spec.output)
    os.makedirs(spec.output, exist_ok=True)
    servers = spec.data
    try:
        reporter.phase("loading data", f"reading {servers.rows} rows from {len(servers.names)} data server(s)")
        started = time.time()
        if spec.plugin:
            result = _run_plugin(spec, servers, reporter)
        elif spec.kind == "sft":
            result = _run_sft(spec, servers.dataset(), reporter)
        else:
            from ._sfft import run_sfft

            result = run_sfft(spec, servers.dataset(), servers, reporter)
        result["seconds"] = time.time() - started
        # The training task or worker reported the steps: keep them in the final state.
        latest = _progress.get(job_id, "progress") or {}
        reporter.state.update({k: v for k, v in latest.items() if k not in ("phase", "started")})
        if not spec.config.keep_checkpoints:
            _remove_checkpoints(spec.output, reporter)
        _progress.put(job_id, "result", result)
        output = result.get("final") or result.get("adapter")  # the adapter alone: sft with merge=False
        reporter.phase("done", f"finished: {output or spec.output}", final=output)
    except BaseException as exc:
        reporter.fail(exc)  # checkpoints and data servers stay: resume_job continues from them
        raise
    servers.close()
    return result


#: Folders of intermediate checkpoints (with optimizer state): sft's Trainer, sfft's Ray Train run.
CHECKPOINT_DIRS = ("checkpoints", "ray_train")


def _remove_checkpoints(output: str, reporter) -> None:
    """Free what only a resume needs once the job has succeeded: a 4-row sfft job of SmolLM2 kept
    2.1 GB, of which 1.6 GB was its epoch checkpoint (weights and AdamW state); ``final/`` stays."""
    removed = 0
    for name in CHECKPOINT_DIRS:
        path = os.path.join(output, name)
        if os.path.isdir(path):
            removed += _size(path)
            shutil.rmtree(path, ignore_errors=True)
    if removed:
        reporter.state.pop("last_checkpoint", None)
        reporter.log(f"removed the intermediate checkpoints ({removed / 2**20:.0f} MiB); "
                     "keep them with sft.bool.keep_checkpoints / sfft.bool.keep_checkpoints")


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(root, f)))


def _run_sft(spec: JobSpec, dataset, reporter) -> dict[str, Any]:
    """Read the conversations here, train in a Ray task that holds the job's CPUs/GPUs.

    The job's driver reserves no resources: Ray Data's own small tasks (block metadata) need a
    CPU, and a driver holding all of them would wait forever for one.
    """
    import ray

    conversations = _conversations(dataset)
    reporter.log(f"{len(conversations)} conversations")
    task = ray.remote(_sft_task).options(num_cpus=spec.cpus_per_worker, num_gpus=spec.num_gpus, max_retries=0,
                                         name=f"{spec.job_id}-train")
    return ray.get(task.remote(spec, conversations))


def _sft_task(spec: JobSpec, conversations: list) -> dict[str, Any]:
    import torch

    from ._model import hf_base_dir
    from ._sft import run_sft

    torch.set_num_threads(max(1, int(round(spec.cpus_per_worker))))
    reporter = _progress.Reporter(spec.job_id, spec.output)
    reporter.phase("loading model", "preparing the base model")
    base = hf_base_dir(spec.model_path)
    return run_sft(conversations, base_dir=base, config=spec.config, output_dir=spec.output, reporter=reporter,
                   resume=spec.resume)


def _run_plugin(spec: JobSpec, servers: DataServers, reporter) -> dict[str, Any]:
    """Byzer-LLM's plugin contract: ``module.sft_train(data_refs, train_params, conf)`` (or ``sfft_train``)."""
    module = importlib.import_module(spec.plugin)
    fn = getattr(module, f"{spec.kind}_train")
    train_params = dict(spec.train_params)
    train_params.setdefault("localPathPrefix", spec.output)
    train_params.setdefault("localModelDir", spec.model_path or "")
    reporter.phase("training", f"running {spec.plugin}.{spec.kind}_train")
    result = fn(servers.refs(), train_params, dict(spec.sys_conf))
    if result is not None and hasattr(result, "__iter__") and not isinstance(result, (str, bytes, dict)):
        for item in result:  # Byzer-LLM's sft_train is a generator of rows
            reporter.log(str(item)[:500])
    final = os.path.join(spec.output, "final")
    return {"final": final if os.path.isdir(final) else None}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: python -m byzerllm_spark.finetune._entry <job_id> [<gcs address>]", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_job(argv[0], argv[1] if len(argv) == 2 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
