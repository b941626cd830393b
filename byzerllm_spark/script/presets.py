"""Presets of Byzer-LLM's ``!byzerllm setup single|sft|sfft;`` statement: the global conf each one sets."""

from __future__ import annotations

#: ``!byzerllm setup <preset>`` defaults (Byzer-LLM's docs: "single" sets the usual single-model values).
PRESETS: dict[str, dict[str, str]] = {
    "single": {
        "dataMode": "model",
        "runIn": "driver",
        "num_gpus": "0",
        "maxConcurrency": "1",
        "standalone": "true",
        "schema": "file",
    },
    "sft": {
        "dataMode": "model",
        "runIn": "driver",
        "num_gpus": "0",
        "maxConcurrency": "1",
        "standalone": "true",
        "schema": "file",
        "detached": "true",
    },
    "sfft": {
        "dataMode": "model",
        "runIn": "driver",
        "num_gpus": "0",
        "maxConcurrency": "1",
        "standalone": "false",
        "schema": "file",
        "detached": "true",
    },
}
