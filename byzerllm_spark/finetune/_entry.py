"""The training job's entrypoint: ``python -m byzerllm_spark.finetune._entry <job_id> <gcs address>``.

Runs as a Ray Job's driver (``detached=True``) or inside a Ray task (``detached=False``). It reads
the job's spec from the cluster's key-value store, the data from the job's data servers, trains,
and publishes progress and the result. On success the data servers are removed; after a failure
or a stop they stay, so that ``resume_job`` can continue from the last checkpoint.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Any

from . import _progress
from .data_servers import DataServers


def collect_from(data_refs: list[Any]):
    """Rows (dicts) of the pushed table: the seed's ``RayContext.collect_from(data_refs)``.

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
        ray.init(address=address or os.environ.get("RAY_ADDRESS", "auto"), namespace=_progress.NAMESPACE,
                 log_to_driver=True)
    spec = _progress.get(job_id, "spec")
    if spec is None:
        raise RuntimeError(f"job {job_id!r} has no spec in the cluster's key-value store")
    output = spec["output"]
    reporter = _progress.Reporter(job_id, output)
    os.makedirs(output, exist_ok=True)
    servers = DataServers.from_json(spec["data"])
    try:
        reporter.phase("loading data", f"reading {servers.rows} rows from {len(servers.names)} data server(s)")
        dataset = servers.dataset()
        started = time.time()
        if spec.get("plugin"):
            result = _run_plugin(spec, servers, reporter)
        elif spec["kind"] == "sft":
            result = _run_sft(spec, dataset, reporter)
        else:
            from ._sfft import run_sfft

            result = run_sfft(spec, dataset, servers, reporter)
        result["seconds"] = time.time() - started
        # The training task or worker reported the steps: keep them in the final state.
        latest = _progress.get(job_id, "progress") or {}
        reporter.state.update({k: v for k, v in latest.items() if k not in ("phase", "started")})
        _progress.put(job_id, "result", result)
        reporter.phase("done", f"finished: {result.get('final') or output}", final=result.get("final"))
    except BaseException as exc:
        reporter.fail(exc)
        raise
    if not spec.get("keep_data"):
        servers.close()
    return result


def _run_sft(spec: dict[str, Any], dataset, reporter) -> dict[str, Any]:
    """Read the conversations here, train in a Ray task that holds the job's CPUs/GPUs.

    The job's driver reserves no resources: Ray Data's own small tasks (block metadata) need a
    CPU, and a driver holding all of them would wait forever for one.
    """
    import ray

    conversations = _conversations(dataset)
    reporter.log(f"{len(conversations)} conversations")
    task = ray.remote(_sft_task).options(num_cpus=float(spec.get("cpus_per_worker") or 1),
                                         num_gpus=float(spec.get("num_gpus") or 0), max_retries=0,
                                         name=f"{spec['job_id']}-train")
    return ray.get(task.remote(spec, conversations))


def _sft_task(spec: dict[str, Any], conversations: list) -> dict[str, Any]:
    import torch

    from ._model import hf_base_dir
    from .params import SftConfig
    from ._sft import run_sft

    torch.set_num_threads(max(1, int(round(float(spec.get("cpus_per_worker") or 1)))))
    reporter = _progress.Reporter(spec["job_id"], spec["output"])
    config = SftConfig.parse(spec["params"])
    reporter.phase("loading model", "preparing the base model")
    base = hf_base_dir(spec.get("model_path"))
    return run_sft(conversations, base_dir=base, config=config, output_dir=spec["output"], reporter=reporter,
                   resume=bool(spec.get("resume")))


def _run_plugin(spec: dict[str, Any], servers: DataServers, reporter) -> dict[str, Any]:
    """Seed 001's contract: ``module.sft_train(data_refs, train_params, conf)`` (or ``sfft_train``)."""
    module = importlib.import_module(spec["plugin"])
    fn = getattr(module, f"{spec['kind']}_train")
    train_params = dict(spec.get("train_params") or {})
    train_params.setdefault("localPathPrefix", spec["output"])
    train_params.setdefault("localModelDir", spec.get("model_path") or "")
    reporter.phase("training", f"running {spec['plugin']}.{spec['kind']}_train")
    result = fn(servers.refs(), train_params, dict(spec.get("sys_conf") or {}))
    if result is not None and hasattr(result, "__iter__") and not isinstance(result, (str, bytes, dict)):
        for item in result:  # the seed's sft_train is a generator of rows
            reporter.log(str(item)[:500])
    final = os.path.join(spec["output"], "final")
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
