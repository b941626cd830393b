"""Progress of a training job, readable from any driver of the cluster.

The job publishes its phase, step, total, loss and ETA to the cluster's key-value actor (:mod:`.._kv`),
so ``job_status`` works from another process or machine without a shared filesystem, and it
prints the same line to its log. The last lines of the log are kept in the store as well, for
jobs that are not Ray Jobs (``detached=False``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


_PREFIX = "finetune"
MAX_LOG_LINES = 200


def _kv():
    import ray

    from .. import _kv as kv

    return kv if ray.is_initialized() else None


def key(job_id: str, what: str) -> bytes:
    return f"{_PREFIX}/{what}/{job_id}".encode()


def put(job_id: str, what: str, value: Any) -> None:
    kv = _kv()
    if kv is not None:
        kv.put(key(job_id, what), json.dumps(value).encode())


def get(job_id: str, what: str) -> Any:
    kv = _kv()
    if kv is None:
        return None
    raw = kv.get(key(job_id, what))
    return json.loads(raw) if raw else None


def list_ids(what: str = "spec") -> list[str]:
    kv = _kv()
    if kv is None:
        return []
    prefix = f"{_PREFIX}/{what}/".encode()
    return sorted(k.decode()[len(prefix):] for k in kv.keys(prefix))


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Reporter:
    """Publishes one job's progress (to the KV store, its log, and ``<output>/progress.json``)."""

    def __init__(self, job_id: str, output_dir: str | None = None, min_interval: float = 0.5) -> None:
        self.job_id = job_id
        self.output_dir = output_dir
        self.min_interval = min_interval
        self.state: dict[str, Any] = {"phase": "starting", "step": 0, "total_steps": None, "loss": None,
                                      "epoch": None, "eta_seconds": None, "started": time.time()}
        self._last_put = 0.0
        self._train_start: float | None = None
        self._first_step: int = 0

    def log(self, message: str) -> None:
        line = f"[byzerllm {self.job_id}] {message}"
        print(line, flush=True)
        try:
            # Several processes of one job log (its driver, the training task or rank 0): append.
            lines = (get(self.job_id, "log") or []) + [line]
            put(self.job_id, "log", lines[-MAX_LOG_LINES:])
        except Exception:  # progress must never fail a training run
            pass

    def phase(self, phase: str, message: str | None = None, **extra: Any) -> None:
        self.state.update(phase=phase, **extra)
        self.log(message or phase)
        self._publish(force=True)

    def step(self, step: int, total: int | None, loss: float | None = None, epoch: float | None = None,
             **extra: Any) -> None:
        now = time.time()
        if self._train_start is None:
            self._train_start, self._first_step = now, step - 1 if step > 0 else 0
        done = step - self._first_step
        eta = None
        if total and done > 0:
            eta = (now - self._train_start) / done * max(0, total - step)
        self.state.update(phase="training", step=step, total_steps=total, eta_seconds=eta, epoch=epoch, **extra)
        if loss is not None:
            self.state["loss"] = float(loss)
        if now - self._last_put >= self.min_interval or (total and step >= total):
            loss_text = f"{self.state['loss']:.4f}" if self.state["loss"] is not None else "?"
            epoch_text = f" epoch {epoch:.2f}" if epoch is not None else ""
            self.log(f"step {step}/{total or '?'} loss {loss_text}{epoch_text} eta {format_eta(eta)}")
            self._publish(force=True)

    def _publish(self, force: bool = False) -> None:
        self.state["updated"] = time.time()
        self._last_put = self.state["updated"]
        try:
            put(self.job_id, "progress", self.state)
        except Exception as exc:  # progress must never fail a training run, but say why it is missing
            print(f"[byzerllm {self.job_id}] progress not published: {type(exc).__name__}: {exc}", file=sys.stderr,
                  flush=True)
        if self.output_dir:
            try:
                os.makedirs(self.output_dir, exist_ok=True)
                tmp = os.path.join(self.output_dir, ".progress.json.tmp")
                with open(tmp, "w") as fh:
                    json.dump(self.state, fh)
                os.replace(tmp, os.path.join(self.output_dir, "progress.json"))
            except OSError:
                pass

    def fail(self, exc: BaseException) -> None:
        self.state.update(phase="failed", error=f"{type(exc).__name__}: {exc}")
        self.log(f"failed: {type(exc).__name__}: {exc}")
        self._publish(force=True)
        print(f"[byzerllm {self.job_id}] failed", file=sys.stderr, flush=True)
