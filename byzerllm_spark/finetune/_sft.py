"""Supervised finetuning: LoRA with peft (QLoRA in 4-bit where CUDA and bitsandbytes exist).

Runs inside the training job (a Ray Job, or a Ray task for ``detached=False``) on conversations
already normalised by :mod:`.formats`. The model's chat template builds the text; the loss is on
the assistant answers only. The output directory gets:

- ``adapter/``     the LoRA adapter (``PeftModel.from_pretrained(base, adapter)``)
- ``final/``       the adapter merged into the base weights, with the tokenizer: a plain Hugging
                   Face directory, ready for ``bls.deploy(model_path=...)``
- ``checkpoints/`` Trainer checkpoints (``save_steps``), ``tensorboard/`` the loss curves
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

from .formats import IGNORE_INDEX, training_example
from ..errors import ConfigError, bad_value
from .config import SftConfig

#: SftConfig fields that are ours or peft's, not TrainingArguments'.
_NOT_TRAINING_ARGS = {
    "max_seq_length", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "quantization",
    "warmup_ratio_cap", "merge", "system_msg", "keep_checkpoints", "training_args", "user_keys",
}


def _import():
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:
        raise ImportError(
            f"finetuning needs torch, transformers and peft: pip install 'byzerllm-spark[finetune]' ({exc})"
        ) from None
    return torch, transformers, peft


def use_4bit(config: SftConfig, torch) -> bool:
    choice = config.quantization
    if choice == "none":
        return False
    import importlib.util

    available = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
    if choice == "4bit" and not available:
        raise ConfigError(bad_value("sft.str.quantization", choice, "4-bit QLoRA needs CUDA and bitsandbytes on the "
                                    "training node; use 'auto' (4-bit where they exist) or 'none'"))
    return available


class _Collator:
    """Pads a batch: ids with the pad token, labels with -100 (no loss on padding)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: Sequence[Mapping[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_examples(tokenizer, conversations: Iterable[Sequence[Mapping[str, str]]], max_seq_length: int,
                   system_msg: str = "") -> list[dict[str, list[int]]]:
    examples = []
    for turns in conversations:
        turns = [dict(t) for t in turns]
        if system_msg and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": system_msg})
        example = training_example(tokenizer, turns, max_seq_length)
        if any(label != IGNORE_INDEX for label in example["labels"]):
            examples.append(example)  # an answer truncated away teaches nothing
    return examples


def training_arguments(config: SftConfig, output_dir: str, steps: int, torch, transformers, four_bit: bool):
    """TrainingArguments from the config, adapted as :mod:`.config` documents."""
    values = {k: v for k, v in config.to_json().items() if k not in _NOT_TRAINING_ARGS}
    values.update(config.training_args)
    cuda = torch.cuda.is_available()
    if not four_bit and values.get("optim") == "paged_adamw_32bit":
        values["optim"] = "adamw_torch"
    if values.get("fp16"):
        values["fp16"] = False
        if cuda:
            if torch.cuda.is_bf16_supported():
                values["bf16"] = True
            else:
                values["fp16"] = True
    if not cuda:
        values["use_cpu"] = True
    cap = max(0, int(steps * config.warmup_ratio_cap))
    if values["warmup_steps"] > cap and "warmup_steps" not in config.user_keys:
        values["warmup_steps"] = cap
    if "logging_steps" not in config.user_keys:
        values["logging_steps"] = max(1, min(int(values["logging_steps"]), steps // 10 or 1))
    report_to = values.get("report_to") or []
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    values["report_to"] = [r for r in report_to if r not in ("tensorboard", "none")]  # ours, below
    values["save_total_limit"] = values.get("save_total_limit")
    values["dataloader_pin_memory"] = cuda
    return transformers.TrainingArguments(output_dir=os.path.join(output_dir, "checkpoints"), **values), \
        "tensorboard" in report_to


def run_sft(conversations: Iterable[Sequence[Mapping[str, str]]], *, base_dir: str, config: SftConfig,
            output_dir: str, reporter=None, resume: bool = False) -> dict[str, Any]:
    """Train a LoRA adapter on ``conversations`` and write adapter/, final/, tensorboard/.

    Args:
        conversations: chat turns per example (``formats.normalise`` output).
        base_dir: a Hugging Face model directory (see ``_model.hf_base_dir``).
        config: parsed ``sft.*`` parameters.
        output_dir: the job's directory.
        reporter: a ``_progress.Reporter`` (step, total, loss, ETA); None prints nothing.
        resume: continue from the last checkpoint in ``output_dir/checkpoints`` when there is one.

    Returns:
        ``{"final": dir, "adapter": dir, "train_samples_per_second": ..., "train_loss": ...,
        "examples": n, "steps": n, "losses": [...]}``
    """
    torch, transformers, peft = _import()
    say = reporter.phase if reporter is not None else (lambda phase, message=None, **kw: None)
    transformers.set_seed(config.seed)
    say("loading model", f"loading the base model from {base_dir}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = build_examples(tokenizer, conversations, config.max_seq_length, config.system_msg)
    if not examples:
        raise ConfigError(bad_value("sft.int.max_seq_length", config.max_seq_length, "no training example is left: "
                                    "every answer lies beyond that many tokens; raise it"))
    four_bit = use_4bit(config, torch)
    load_kwargs: dict[str, Any] = {}
    if four_bit:
        load_kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
        )
        load_kwargs["device_map"] = {"": 0}
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32 if not four_bit else None,
                                                              **load_kwargs)
    if four_bit:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    lora = peft.LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    steps = math.ceil(len(examples) / per_step) * config.num_train_epochs
    if config.max_steps > 0:
        steps = config.max_steps
    args, tensorboard = training_arguments(config, output_dir, steps, torch, transformers, four_bit)
    callbacks: list[Any] = [_ProgressCallback(reporter)] if reporter is not None else []
    losses: list[float] = []
    callbacks.append(_LossRecorder(losses))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        callbacks.append(transformers.integrations.TensorBoardCallback(
            tb_writer=SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples,
                                   data_collator=_Collator(tokenizer.pad_token_id), callbacks=callbacks)
    last = _last_checkpoint(os.path.join(output_dir, "checkpoints")) if resume else None
    say("training", f"training on {len(examples)} examples, {steps} optimizer steps"
        + (f", resuming from {last}" if last else ""), total_steps=steps, examples=len(examples))
    result = trainer.train(resume_from_checkpoint=last)
    metrics = dict(result.metrics)
    adapter_dir = os.path.join(output_dir, "adapter")
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    out: dict[str, Any] = {"adapter": adapter_dir, "examples": len(examples), "steps": steps, "losses": losses,
                           "train_samples_per_second": metrics.get("train_samples_per_second"),
                           "train_runtime": metrics.get("train_runtime"), "train_loss": metrics.get("train_loss")}
    if config.merge:
        say("merging", "merging the adapter into the base weights")
        final_dir = os.path.join(output_dir, "final")
        if four_bit:
            # A 4-bit base cannot take the merged weights: merge into a full-precision copy.
            base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
            merged = peft.PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        else:
            merged = model.merge_and_unload()
        merged.save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
        out["final"] = final_dir
    return out


def _last_checkpoint(path: str) -> str | None:
    if not os.path.isdir(path):
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(path)


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class _ProgressCallback(_callback_base()):  # type: ignore[misc]
    """step / total / loss / ETA after every optimizer step (loss from the logged values)."""

    def __init__(self, reporter) -> None:
        self.reporter = reporter
        self.loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])
            self.reporter.step(state.global_step, state.max_steps, self.loss, state.epoch)

    def on_step_end(self, args, state, control, **kwargs):
        # A logging step reports from on_log, which comes after this with the step's loss.
        if args.logging_steps and state.global_step % int(args.logging_steps) == 0:
            return
        self.reporter.step(state.global_step, state.max_steps, self.loss, state.epoch)


class _LossRecorder(_callback_base()):  # type: ignore[misc]
    def __init__(self, losses: list[float]) -> None:
        self.losses = losses

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

