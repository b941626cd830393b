"""Continued pretraining (sfft): causal LM loss on raw text, on several Ray Train workers.

Ray Train's ``TorchTrainer`` runs ``num_workers`` workers under DDP (gloo on CPU, NCCL on GPU),
or under DeepSpeed when ``deepspeedConfig`` is given and DeepSpeed is installed. Each worker
tokenises its shard of the table, packs it into chunks of ``sfft.int.max_length`` tokens and
trains on them; workers run the same number of steps (the smallest shard decides), so DDP never
waits on a worker that ran out of data.

Checkpoints: one per epoch, written by rank 0 straight into the run's directory under
``<output>/ray_train/<job>/checkpoint_epoch_<n>`` and reported with ``ray.train.report``
(``num_to_keep=1``). A resumed job (``resume_job``) starts a new Ray Train run in the same storage
and loads the newest checkpoint of any earlier run: weights, optimizer and the epoch counter.
The final model is written to ``<output>/final`` by rank 0.

Why a loop of our own and not ``transformers.Trainer`` under Ray Train (``prepare_trainer`` and
``RayTrainReportCallback``): measured 2026-11-29 here with this module's test settings (SmolLM2,
2 CPU workers, 2 epochs), that setup
- failed under DDP: both workers of one node share Trainer's ``output_dir``, and rank 1's
  ``RayTrainReportCallback.on_save`` copied ``checkpoint-2`` while rank 0 was still writing it
  (``shutil.Error``: a temporary file vanished mid-copy);
- ran under DeepSpeed ZeRO-1, but wrote every checkpoint twice, 2.7 GB in Trainer's ``output_dir``
  and the same 2.7 GB copied into Ray's storage, where this loop writes once, straight into the
  run's storage (``NO_UPLOAD``);
- lays checkpoints out as ``checkpoint_<time>/checkpoint/global_step<n>``, where resume and the
  tests rely on ``checkpoint_epoch_<n>`` with ``meta.json`` and DeepSpeed's own ``deepspeed/``.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from ..errors import ConfigError, bad_value
from . import _progress
from .config import JobSpec, SfftConfig

CHECKPOINT_PREFIX = "checkpoint_epoch_"


def latest_checkpoint(storage: str) -> str | None:
    """The newest complete epoch checkpoint under ``storage`` (any run), or None."""
    best: tuple[int, float, str] | None = None
    for meta_path in glob.glob(os.path.join(storage, "*", f"{CHECKPOINT_PREFIX}*", "meta.json")):
        try:
            with open(meta_path) as fh:
                epoch = int(json.load(fh)["epoch"])
        except (OSError, ValueError, KeyError):
            continue  # a checkpoint killed while being written has no readable meta.json
        candidate = (epoch, os.path.getmtime(meta_path), os.path.dirname(meta_path))
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    return best[2] if best else None


def run_sfft(spec: JobSpec, dataset, servers, reporter) -> dict[str, Any]:
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ._model import hf_base_dir

    reporter.phase("loading model", "preparing the base model")
    base = hf_base_dir(spec.model_path)
    output = spec.output
    storage = os.path.join(output, "ray_train")
    resume_from = latest_checkpoint(storage) if spec.resume else None
    num_workers = spec.num_workers
    use_gpu = spec.num_gpus > 0
    resources = {"CPU": spec.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = spec.num_gpus / num_workers
    keep = spec.keep_partition_num
    loop_config = {
        "job_id": spec.job_id, "base": base, "output": output, "config": spec.config,
        "resume_from": resume_from, "threads": int(round(resources["CPU"])) or 1,
        # keepPartitionNum: each worker reads whole Spark partitions (blocks as pushed); otherwise
        # Ray Data splits the rows evenly between the workers.
        "refs": servers.refs() if keep else None,
    }
    reporter.phase("training", f"continued pretraining on {num_workers} worker(s)"
                   + (f", resuming from {resume_from}" if resume_from else ""))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=spec.job_id, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets=None if keep else {"train": dataset},
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    # Rank 0's last progress (epoch losses, checkpoint) also comes back with Ray Train's result, so
    # the job's final status does not hang on the workers' key-value writes alone.
    progress = metrics.pop("progress", None) or {}
    reporter.state.update({k: v for k, v in progress.items() if k not in ("phase", "started")})
    reporter._publish()
    return {"final": os.path.join(output, "final"), "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "metrics": metrics, "resumed_from": resume_from}


def _set_nccl_ifname() -> None:
    """Byzer-LLM's ``sfft.bool.setup_nccl_socket_ifname_by_ip``: NCCL on the interface of the node IP."""
    import socket

    import ray

    ip = ray.util.get_node_ip_address()
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
                os.environ["NCCL_SOCKET_IFNAME"] = name
                return
    except ImportError:
        pass


def _chunks(texts, tokenizer, max_length: int):
    """Pack texts (each ended by EOS) into chunks of exactly ``max_length`` tokens."""
    buffer: list[int] = []
    eos = tokenizer.eos_token_id
    for text in texts:
        if not text:
            continue
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buffer.append(eos)
        while len(buffer) >= max_length:
            yield buffer[:max_length]
            buffer = buffer[max_length:]
    if len(buffer) > 1:
        yield buffer  # the remainder is trained on too: small tables would lose most rows otherwise


def _train_loop(cfg: dict[str, Any]) -> None:
    import random

    import ray
    import ray.train
    import torch
    import torch.distributed as dist
    import transformers
    from ray.train import Checkpoint

    config: SfftConfig = cfg["config"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg["threads"])
    if config.setup_nccl_socket_ifname_by_ip:
        _set_nccl_ifname()
    transformers.set_seed(config.seed + rank)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg["base"])

    # ---- data: this worker's shard, tokenised and packed
    text_column = "text"
    if cfg["refs"] is not None:
        texts = []
        for ref in cfg["refs"][rank::world]:
            texts.extend(ray.get(ref).column(text_column).to_pylist())
    else:
        shard = ray.train.get_dataset_shard("train")
        texts = []
        for batch in shard.iter_batches(batch_format="pyarrow", batch_size=1024):
            texts.extend(batch.column(text_column).to_pylist())
    chunks = list(_chunks(texts, tokenizer, config.max_length))
    batch_size = config.per_device_train_batch_size
    accumulate = config.gradient_accumulation_steps
    local_steps = len(chunks) // (batch_size * accumulate) or (1 if chunks else 0)
    steps = torch.tensor([local_steps], dtype=torch.long)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    steps_per_epoch = int(steps.item())
    if config.steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    if steps_per_epoch == 0:
        raise ConfigError(bad_value("num_workers", world, f"worker {rank} received no text to train on: the table "
                                    "has fewer rows than workers; use fewer workers or more rows"))
    epochs = config.num_train_epochs
    total = epochs * steps_per_epoch

    # ---- model, resumed from the newest checkpoint when there is one
    checkpoint = ray.train.get_checkpoint()
    ckpt_dir = None
    if checkpoint is not None:
        ckpt_dir = checkpoint.path
    elif cfg.get("resume_from"):
        ckpt_dir = cfg["resume_from"]
    start_epoch, global_step = 0, 0
    source = cfg["base"]
    if ckpt_dir:
        with open(os.path.join(ckpt_dir, "meta.json")) as fh:
            meta = json.load(fh)
        start_epoch, global_step = int(meta["epoch"]) + 1, int(meta["global_step"])
        source = ckpt_dir
    device = ray.train.torch.get_device()
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    engine = None
    if config.deepspeed:
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                       config=config.deepspeed)
        if ckpt_dir and os.path.isdir(os.path.join(ckpt_dir, "deepspeed")):
            engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"))
        net = engine
    else:
        model = ray.train.torch.prepare_model(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        if ckpt_dir and os.path.exists(os.path.join(ckpt_dir, "optimizer.pt")):
            optimizer.load_state_dict(torch.load(os.path.join(ckpt_dir, "optimizer.pt"), map_location=device))
        net = model
    warmup = config.warmup_steps
    base_lr = config.learning_rate

    reporter = _progress.Reporter(cfg["job_id"], cfg["output"]) if rank == 0 else None
    if reporter is not None:
        reporter.log(f"{world} worker(s), {len(chunks)} chunks on rank 0, {steps_per_epoch} steps per epoch, "
                     f"epochs {start_epoch + 1}..{epochs}" + (f", resumed from {ckpt_dir}" if ckpt_dir else ""))
        if ckpt_dir:
            reporter.state["resumed_from"] = ckpt_dir
            reporter.state["start_epoch"] = start_epoch
        group = ray.util.get_current_placement_group()
        if group is not None:
            # A force-cancelled detached=False job leaves Ray Train's placement group behind,
            # holding the workers' CPUs; cancel_job removes it by this id.
            reporter.state["placement_group"] = group.id.hex()
    order = list(range(len(chunks)))
    for epoch in range(start_epoch, epochs):
        random.Random(config.seed * 1000 + epoch * world + rank).shuffle(order)
        net.train()
        epoch_losses = []
        for step in range(steps_per_epoch):
            step_loss = 0.0
            for micro in range(accumulate):
                start = (step * accumulate + micro) * batch_size
                picked = [chunks[order[(start + j) % len(order)]] for j in range(batch_size)]
                width = max(len(c) for c in picked)
                ids = torch.full((len(picked), width), tokenizer.eos_token_id or 0, dtype=torch.long)
                labels = torch.full((len(picked), width), -100, dtype=torch.long)
                for i, chunk in enumerate(picked):
                    ids[i, : len(chunk)] = torch.tensor(chunk)
                    labels[i, : len(chunk)] = torch.tensor(chunk)
                out = net(input_ids=ids.to(device), labels=labels.to(device))
                loss = out.loss / accumulate
                if engine is not None:
                    engine.backward(loss)
                else:
                    loss.backward()
                step_loss += float(loss.detach())
            if engine is not None:
                engine.step()
            else:
                global_step_next = global_step + 1
                if warmup > 0 and global_step_next <= warmup:
                    for group in optimizer.param_groups:
                        group["lr"] = base_lr * global_step_next / warmup
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            global_step += 1
            mean = torch.tensor([step_loss])
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(mean)
                mean /= world
            epoch_losses.append(float(mean.item()))
            if reporter is not None:
                reporter.step(global_step, total, epoch_losses[-1], epoch + (step + 1) / steps_per_epoch)
        # ---- checkpoint at the end of every epoch
        run_dir = ctx.get_storage().experiment_fs_path
        ckpt = os.path.join(run_dir, f"{CHECKPOINT_PREFIX}{epoch:04d}")
        epoch_loss = sum(epoch_losses) / len(epoch_losses)
        if engine is not None:
            engine.save_checkpoint(os.path.join(ckpt, "deepspeed"))
        if rank == 0:
            unwrapped = net.module if hasattr(net, "module") else net
            unwrapped.save_pretrained(ckpt)
            if engine is None and config.save_optimizer:
                torch.save(optimizer.state_dict(), os.path.join(ckpt, "optimizer.pt"))
            with open(os.path.join(ckpt, "meta.json"), "w") as fh:  # last: marks the checkpoint complete
                json.dump({"epoch": epoch, "global_step": global_step, "loss": epoch_loss}, fh)
            reporter.log(f"epoch {epoch + 1}/{epochs} loss {epoch_loss:.4f}: checkpoint {ckpt}")
            reporter.state.setdefault("epoch_losses", []).append(epoch_loss)
            reporter.state["last_checkpoint"] = ckpt
            reporter._publish()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        from ray.train import CheckpointUploadMode

        progress = json.loads(json.dumps(reporter.state)) if reporter is not None else {}  # a copy, as sent
        ray.train.report({"epoch": epoch, "loss": epoch_loss, "global_step": global_step, "progress": progress},
                         checkpoint=Checkpoint.from_directory(ckpt) if rank == 0 else None,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
    if rank == 0:
        final = os.path.join(cfg["output"], "final")
        unwrapped = net.module if hasattr(net, "module") else net
        unwrapped.save_pretrained(final)
        tokenizer.save_pretrained(final)
