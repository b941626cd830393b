"""Submitting training jobs and following them: status, logs, progress, cancel, resume, output.

``detached=True`` submits a **Ray Job** (``ray.job_submission``): its driver process runs
``python -m byzerllm_spark.finetune._entry <job_id>`` on the cluster, survives the caller's exit,
keeps its logs, and can be stopped. Ray Jobs live in Ray's dashboard process (the job server), so
the cluster must run one: ``bls.init(include_dashboard=True)`` for an embedded cluster, or a cluster
started by ``ray start --head`` (dashboard on by default).

``detached=False`` runs the same entrypoint in a Ray task and waits for it, showing progress;
cancelling the call (or ``cancel_job`` from another thread) kills the task.

Everything a job publishes (spec, progress, last log lines, result) sits in the cluster's
key-value store, so any driver connected to the cluster can follow a job by its id.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from .. import cluster, settings
from ..errors import ClusterError, ConfigError, JobError, ResourceError, bad_value
from . import _progress
from .config import JobSpec

logger = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: Environment a Ray Job's driver inherits from the submitter: the same folders and tokenizer setting.
_JOB_ENV = (settings.HOME_ENV, settings.CACHE_DIR_ENV, "HF_HOME", "TOKENIZERS_PARALLELISM")
#: Seconds to wait for a node's dashboard agent to take a Ray Job.
AGENT_WAIT_S = 60
#: ANSI escape sequences (colours, cursor moves) that Ray writes into job logs.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


@dataclass(frozen=True)
class FinetuneJob:
    """A submitted training job. Pass it (or its ``job_id``) to ``job_status``, ``wait``, ...

    Attributes:
        job_id: the job's id, also its Ray Job submission id and its output folder's name.
        kind: ``sft`` or ``sfft``.
        output: the job's directory on the cluster (``final/``, ``adapter/``, ``tensorboard/``...).
        detached: whether it runs as a Ray Job.
    """

    job_id: str
    kind: str
    output: str
    detached: bool

    def __str__(self) -> str:
        return self.job_id


#: Ray task refs of this process's non-detached jobs.
_local_refs: dict[str, Any] = {}


def _job_id(value: Any) -> str:
    if isinstance(value, FinetuneJob):
        return value.job_id
    if isinstance(value, str) and value:
        return value
    raise ConfigError(bad_value("job", value, "pass the FinetuneJob that bls.sft/bls.sfft returned, or its job_id"))


def load_spec(job: Any) -> JobSpec:
    """The spec of a job (a FinetuneJob or its id) from the cluster's key-value store.

    Raises:
        JobError: the cluster does not know the job.
    """
    cluster.ensure_init()
    job_id = _job_id(job)
    data = _progress.get(job_id, "spec")
    if data is None:
        known = _progress.list_ids("spec")
        raise JobError(f"job {job_id!r} is not known to this cluster; known jobs: {known[-10:] if known else 'none'}")
    return JobSpec.from_json(data)


def _as_job(spec: JobSpec) -> FinetuneJob:
    return FinetuneJob(job_id=spec.job_id, kind=spec.kind, output=spec.output, detached=spec.detached)


# ---- the job server ------------------------------------------------------------------------
def _dashboard_url() -> str | None:
    info = cluster.ensure_init()
    if info.dashboard_url:
        return info.dashboard_url
    try:
        import ray

        url = ray._private.worker.get_dashboard_url()
    except Exception:
        url = None
    if url:
        return url if url.startswith("http") else f"http://{url}"
    return os.environ.get("RAY_DASHBOARD_ADDRESS") or None


def job_client():
    """A ``JobSubmissionClient`` for this cluster's job server.

    Raises:
        ClusterError: the cluster runs no job server (no dashboard), saying how to get one.
    """
    from ray.job_submission import JobSubmissionClient

    url = _dashboard_url()
    if url:
        try:
            return JobSubmissionClient(url)
        except Exception as exc:
            reason = f"its dashboard at {url} does not answer as a job server ({str(exc).splitlines()[0][:200]})"
    else:
        reason = "it was started without a dashboard"
    raise ClusterError(
        f"detached=True submits a Ray Job, but this Ray cluster has no job server: {reason}. Ray Jobs live in "
        "Ray's dashboard: start the embedded cluster with bls.init(include_dashboard=True), or join a cluster "
        "started with `ray start --head` (dashboard on by default; set RAY_DASHBOARD_ADDRESS if it is not "
        "found); or pass detached=False to train in a Ray task while this call waits"
    )


# ---- submission ----------------------------------------------------------------------------
def new_job_id(kind: str, name: str | None) -> str:
    """``<kind>-<name>-<time>-<uuid>``; a name that already starts with ``<kind>-`` keeps its own prefix."""
    owner = name or os.environ.get("USER") or "byzerllm"
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in owner)[:40]
    if not safe.startswith(f"{kind}-"):
        safe = f"{kind}-{safe}"
    return f"{safe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def job_dir(output: str | None, job_id: str) -> str:
    """A job's directory: ``<output>/<job_id>``, ``output`` defaulting to ``settings.jobs_dir()``."""
    return os.path.join(os.path.abspath(os.path.expanduser(output or settings.jobs_dir())), job_id)


def check_resources(kind: str, num_gpus: float, num_workers: int, cpus_per_worker: float) -> None:
    """Refuse, before anything starts, what no node or the whole cluster can give."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have = ", ".join(f"CPU={r.get('CPU', 0):g} GPU={r.get('GPU', 0):g}" for r in nodes)
    total_gpu = sum(r.get("GPU", 0) for r in nodes)
    if num_gpus and kind == "sft" and not any(r.get("GPU", 0) >= num_gpus for r in nodes):
        raise ResourceError(
            f"num_gpus={num_gpus!r} can never be satisfied: sft trains on one machine (as in Byzer-LLM) and no node has "
            f"that many GPUs (nodes: {have}); lower num_gpus, or use num_gpus=0 to train on CPU"
        )
    if num_gpus and total_gpu < num_gpus:
        raise ResourceError(
            f"num_gpus={num_gpus!r} can never be satisfied: the cluster has {total_gpu:g} GPUs (nodes: {have}); "
            "lower num_gpus, or use num_gpus=0 to train on CPU"
        )
    per_worker = cpus_per_worker
    total_cpu = sum(r.get("CPU", 0) for r in nodes)
    if not any(r.get("CPU", 0) >= per_worker for r in nodes) or per_worker * num_workers > total_cpu + 1e-9:
        raise ResourceError(
            f"num_workers={num_workers} x cpus_per_worker={per_worker:g} needs {per_worker * num_workers:g} CPUs but "
            f"the cluster has {total_cpu:g} (nodes: {have}); use fewer workers or fewer CPUs per worker"
        )


def submit(spec: JobSpec, *, progress: bool = True) -> FinetuneJob:
    """Store ``spec`` under its job id and start the job (Ray Job, or Ray task and wait)."""
    import ray

    job_id = spec.job_id
    _progress.put(job_id, "spec", spec.to_json())
    _progress.put(job_id, "progress", {"phase": "submitted", "step": 0, "total_steps": None, "loss": None,
                                       "eta_seconds": None, "updated": time.time()})
    job = _as_job(spec)
    # The job's driver holds no resources: the training (a task for sft, Ray Train workers for
    # sfft) reserves the CPUs/GPUs, and Ray Data's small tasks in the driver can always run.
    cpus = gpus = 0.0
    if spec.detached:
        client = job_client()
        python = sys.executable if cluster.info().embedded else "python"
        env = {k: v for k, v in os.environ.items() if k in _JOB_ENV}
        submit_job = functools.partial(
            client.submit_job,
            entrypoint=f"{python} -m byzerllm_spark.finetune._entry {job_id} {ray.get_runtime_context().gcs_address}",
            submission_id=job_id,
            entrypoint_num_cpus=cpus,
            runtime_env={"env_vars": env} if env else None,
            metadata={"byzerllm_spark": spec.kind, "output": spec.output},
        )
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                submit_job()
                break
            except RuntimeError as exc:
                # The job server answers 500 "No available agent to submit job, please try again
                # later" until the node's dashboard agent has registered (slow on a loaded node),
                # and for good when the agent could not start (its port 52365 held by another
                # Ray instance on the machine: seen here, see the session's dashboard_agent.log).
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise ClusterError(
                        f"the job server did not take job {job_id!r}: {exc} If it persists, the node's dashboard "
                        "agent did not start (see dashboard_agent.log in the Ray session's logs; another Ray "
                        "instance on the machine may hold its port); detached=False trains in a Ray task "
                        "without the job server") from exc
                time.sleep(2)
        logger.info("submitted Ray Job %s", job_id)
        return job
    from ._entry import run_job

    task = ray.remote(run_job).options(num_cpus=cpus, num_gpus=gpus, max_retries=0, name=job_id)
    _local_refs[job_id] = task.remote(job_id)
    try:
        wait(job, progress=progress)
    except KeyboardInterrupt:
        cancel_job(job)
        raise
    return job


# ---- following a job -----------------------------------------------------------------------
def _ray_status(spec: JobSpec) -> tuple[str, str | None]:
    """(status, message) from Ray: the Ray Job's status, or the local task's state."""
    import ray

    job_id = spec.job_id
    if spec.detached:
        info = job_client().get_job_info(job_id)
        return str(info.status).split(".")[-1], info.message
    ref = _local_refs.get(job_id)
    if ref is None:
        progress = _progress.get(job_id, "progress") or {}
        phase = progress.get("phase")
        status = {"done": "SUCCEEDED", "failed": "FAILED", "stopped": "STOPPED"}.get(phase, "UNKNOWN")
        return status, "a detached=False job of another process: status from its last progress report"
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return "RUNNING", None
    try:
        ray.get(ref)
        return "SUCCEEDED", None
    except (ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError) as exc:
        return "STOPPED", (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    except Exception as exc:
        return "FAILED", (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:1000]


def job_status(job: Any) -> dict[str, Any]:
    """Where a job stands.

    Returns:
        ``{"job_id", "kind", "status"`` (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED),
        ``"phase"`` (submitted, loading data, loading model, training, merging, done, failed),
        ``"step", "total_steps", "loss", "epoch", "eta_seconds", "output", "final", "error",
        "message"}``. sfft jobs add ``epoch_losses`` and ``last_checkpoint``.

    Raises:
        JobError: the cluster does not know the job.

    Example:
        >>> bls.job_status(job)["step"]  # doctest: +SKIP
        12
    """
    spec = load_spec(job)
    status, message = _ray_status(spec)
    progress = _progress.get(spec.job_id, "progress") or {}
    result = _progress.get(spec.job_id, "result") or {}
    out = {
        "job_id": spec.job_id, "kind": spec.kind, "status": status, "phase": progress.get("phase"),
        "step": progress.get("step", 0), "total_steps": progress.get("total_steps"), "loss": progress.get("loss"),
        "epoch": progress.get("epoch"), "eta_seconds": progress.get("eta_seconds"), "output": spec.output,
        "final": result.get("final"), "error": progress.get("error"), "message": message,
    }
    for key in ("epoch_losses", "last_checkpoint", "resumed_from", "start_epoch", "examples"):
        if key in progress:
            out[key] = progress[key]
    if status in ("FAILED", "STOPPED") and out["phase"] not in ("failed", "stopped"):
        out["phase"] = "failed" if status == "FAILED" else "stopped"
    return out


def job_logs(job: Any) -> str:
    """The job's log as plain text: the Ray Job's driver log (detached), else the last lines it
    published. Ray's colour codes are removed."""
    spec = load_spec(job)
    if spec.detached:
        return strip_ansi(job_client().get_job_logs(spec.job_id))
    return "\n".join(_progress.get(spec.job_id, "log") or []) + "\n"


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (Ray colours its workers' log prefixes)."""
    return _ANSI.sub("", text)


def cancel_job(job: Any, *, purge: bool = False) -> dict[str, Any]:
    """Stop a job. Its checkpoints and data servers stay, so ``resume_job`` can continue it.

    Args:
        purge: also remove the job's data servers (their data is then gone; no resume).

    Returns:
        the job's status after the stop.
    """
    import ray

    spec = load_spec(job)
    job_id = spec.job_id
    if spec.detached:
        job_client().stop_job(job_id)
    elif job_id in _local_refs:
        ray.cancel(_local_refs[job_id], force=True)
    progress = _progress.get(job_id, "progress") or {}
    if not spec.detached and progress.get("placement_group"):
        _remove_placement_group(progress["placement_group"])
    if progress.get("phase") not in ("done", "failed"):
        progress["phase"] = "stopped"
        _progress.put(job_id, "progress", progress)
    deadline = time.time() + 60
    while time.time() < deadline and _ray_status(spec)[0] not in TERMINAL:
        time.sleep(0.5)
    if purge and spec.data is not None:
        spec.data.close()
    return job_status(job_id)


def _remove_placement_group(hex_id: str) -> None:
    """Free the CPUs of a killed sfft run: its Ray Train placement group outlives a killed task."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    entry = placement_group_table().get(hex_id)
    if entry is None or entry.get("state") == "REMOVED":
        return
    try:
        ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id))))
    except Exception:  # already gone
        logger.debug("placement group %s not removed", hex_id, exc_info=True)


def job_output(job: Any) -> str:
    """The directory to deploy: ``<output>/final`` (the merged model for sft, the trained model for sfft), or
    ``<output>/adapter`` for sft with ``merge=False`` (the LoRA adapter: ``deploy(lora_adapters=...)`` takes it).

    Raises:
        JobError: the job has not succeeded (its status says why).
    """
    spec = load_spec(job)
    result = _progress.get(spec.job_id, "result")
    if not result or not (result.get("final") or result.get("adapter")):
        status = job_status(spec.job_id)
        raise JobError(
            f"job {spec.job_id!r} has no output yet: status {status['status']}, phase {status['phase']}"
            + (f", error: {status['error']}" if status.get("error") else "") + "; bls.wait(job) first"
        )
    return result.get("final") or result["adapter"]


def resume_job(job: Any, *, detached: bool | None = None, progress: bool = True) -> FinetuneJob:
    """Start a stopped or failed job again from its last checkpoint (same data, same output).

    Returns:
        the new job (id ``<old id>-r<n>``), writing into the old job's output directory.
    """
    spec = load_spec(job)
    base_id = spec.resumes or spec.job_id
    n = 1 + sum(1 for i in _progress.list_ids("spec") if i.startswith(base_id + "-r"))
    spec = spec.replace(job_id=f"{base_id}-r{n}", resume=True, resumes=base_id,
                        detached=spec.detached if detached is None else bool(detached))
    try:
        alive = spec.data is not None and bool(spec.data.handles())
    except ValueError:  # Ray: no actor of that name
        alive = False
    if not alive:
        raise JobError(
            f"job {base_id!r} cannot be resumed: its data servers are gone (the job succeeded, or was cancelled "
            "with purge=True, or the cluster restarted); submit it again with bls.sft/bls.sfft"
        )
    return submit(spec, progress=progress)


def wait(job: Any, *, timeout: float | None = None, progress: bool = True, poll: float = 1.0,
         check: bool = True) -> dict[str, Any]:
    """Wait for a job to end, showing a progress bar (step / total, loss, ETA).

    In a notebook the bar is a widget (``tqdm.auto``); elsewhere a text bar on stderr.

    Args:
        timeout: seconds to wait; None waits for the end.
        progress: show the bar.
        check: raise JobError when the job failed or was stopped.

    Returns:
        the final ``job_status``.

    Raises:
        JobError: failed or stopped (with ``check``), or still running after ``timeout``.
    """
    job_id = _job_id(job)
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = None
    try:
        while True:
            status = job_status(job_id)
            if progress:
                bar = _update_bar(bar, status)
            if status["status"] in TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"job {job_id!r} is still {status['status']} after timeout={timeout:g}s "
                               f"(step {status['step']}/{status['total_steps']})")
            time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()
    if check and status["status"] != "SUCCEEDED":
        tail = "\n".join(job_logs(job_id).strip().splitlines()[-15:])
        raise JobError(f"job {job_id!r} {status['status']}: {status.get('error') or status.get('message') or ''}"
                       f"\n--- last log lines ---\n{tail}")
    return status


def _update_bar(bar, status: Mapping[str, Any]):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # no tqdm: one line per poll
        print(f"{status['job_id']}: {status['phase']} step {status['step']}/{status['total_steps']} "
              f"loss {status['loss']}", file=sys.stderr)
        return None
    if bar is None:
        bar = tqdm(total=status.get("total_steps") or None, desc=status["job_id"][:40], unit="step")
    if status.get("total_steps") and bar.total != status["total_steps"]:
        bar.total = status["total_steps"]
    step = status.get("step") or 0
    if step >= bar.n:
        bar.update(step - bar.n)
    postfix = {"phase": status.get("phase")}
    if status.get("loss") is not None:
        postfix["loss"] = f"{status['loss']:.4f}"
    if status.get("eta_seconds") is not None:
        postfix["eta"] = _progress.format_eta(status["eta_seconds"])
    bar.set_postfix(postfix, refresh=True)
    return bar


def list_jobs() -> list[dict[str, Any]]:
    """Every training job the cluster knows: id, kind, status, phase, output."""
    cluster.ensure_init()
    out = []
    for job_id in _progress.list_ids("spec"):
        try:
            s = job_status(job_id)
        except Exception as exc:  # a Ray Job the job server forgot
            s = {"job_id": job_id, "status": "UNKNOWN", "phase": None, "output": None, "kind": None,
                 "message": str(exc)[:200]}
        out.append({k: s.get(k) for k in ("job_id", "kind", "status", "phase", "output")})
    return out

