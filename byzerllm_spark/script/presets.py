"""Presets of Byzer-LLM's ``!byzerllm setup single|sft|sfft;`` statement: the global conf each one sets."""

from __future__ import annotations

_SINGLE = {
    "dataMode": "model",
    "runIn": "driver",
    "num_gpus": "0",
    "maxConcurrency": "1",
    "standalone": "true",
    "schema": "file",
}

#: ``!byzerllm setup <preset>`` values (Byzer-LLM's docs: "single" sets the usual single-model values;
#: the finetune presets run detached, and ``sfft`` spans several workers, so it is not standalone).
PRESETS: dict[str, dict[str, str]] = {
    "single": dict(_SINGLE),
    "sft": {**_SINGLE, "detached": "true"},
    "sfft": {**_SINGLE, "standalone": "false", "detached": "true"},
}
