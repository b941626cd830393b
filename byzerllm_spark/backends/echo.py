"""An echo model written to the seed 001 plugin contract.

Deploy it with ``pretrained_model_type="custom/echo"``. It answers each instruction with itself
(prefixed by ``echo_prefix`` from ``infer_params``, default empty) and reports the keyword
arguments it received in its metadata. It loads nothing, so it measures the serving path alone.
"""

from __future__ import annotations

import types
from typing import Dict, List


class EchoModel:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix


def init_model(model_dir, infer_params: Dict[str, str] = {}, sys_conf: Dict[str, str] = {}):  # noqa: B006 (seed signature)
    model = EchoModel(str(infer_params.get("echo_prefix", "")))
    model.stream_chat = types.MethodType(stream_chat, model)
    return model, None


def stream_chat(
    self,
    tokenizer,
    ins: str,
    his: List[Dict[str, str]] = [],  # noqa: B006 (seed signature)
    max_length: int = 4090,
    top_p: float = 0.95,
    temperature: float = 0.1,
    **kwargs,
):
    meta = {"history_turns": str(len(his))}
    for key, value in kwargs.items():
        meta[f"kw.{key}"] = str(value)
    return [(self.prefix + ins, {"metadata": meta})]
