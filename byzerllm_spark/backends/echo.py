"""An echo model written to Byzer-LLM's model plugin contract.

Deploy it with ``pretrained_model_type="custom/echo"``. It answers each instruction with itself
(prefixed by ``echo_prefix`` from ``infer_params``, default empty) and reports the keyword
arguments it received in its metadata. It loads nothing, so it measures the serving path alone.

``infer_params``: ``echo_prefix`` (text put before each answer), ``echo_init_seconds`` (sleep in
``init_model``, to stand in for a slow model load), ``echo_delay_ms`` (sleep per answer, to stand in
for model latency).

It also has the contract's ``sft_train`` / ``sfft_train``: they train nothing, read every row the data
servers hold and write what arrived to ``<localPathPrefix>/final/echo_train.json`` (rows, columns,
the first row, the ``train_params`` keys), so ``bls.sft(df, pretrained_model_type="custom/echo")``
exercises the plugin finetune path end to end.
"""

from __future__ import annotations

import json
import os
import time
import types
from typing import Any, Dict, Iterator, List


#: The Spark functions read this to size their requests: echo answers in microseconds.
PREFERRED_BATCH_SIZE = 5000
#: The context a plugin may declare (optional): the worker refuses a ``max_length`` above it.
CONTEXT_LENGTH = 8192


class EchoModel:
    def __init__(self, prefix: str, delay_s: float) -> None:
        self.prefix = prefix
        self.delay_s = delay_s


def init_model(model_dir, infer_params: Dict[str, str] = {}, sys_conf: Dict[str, str] = {}):  # noqa: B006 (Byzer-LLM's signature)
    time.sleep(float(infer_params.get("echo_init_seconds", 0)))
    model = EchoModel(str(infer_params.get("echo_prefix", "")), float(infer_params.get("echo_delay_ms", 0)) / 1000)
    model.stream_chat = types.MethodType(stream_chat, model)
    return model, None


def stream_chat(
    self,
    tokenizer,
    ins: str,
    his: List[Dict[str, str]] = [],  # noqa: B006 (Byzer-LLM's signature)
    max_length: int = 4090,
    top_p: float = 0.95,
    temperature: float = 0.1,
    **kwargs,
):
    if self.delay_s:
        time.sleep(self.delay_s)
    meta = {"history_turns": str(len(his))}
    for key, value in kwargs.items():
        meta[f"kw.{key}"] = str(value)
    return [(self.prefix + ins, {"metadata": meta})]


def sft_train(data_refs: List[Any], train_params: Dict[str, str], conf: Dict[str, str]) -> Iterator[Dict[str, Any]]:
    """Read the pushed rows (``ray.get`` of each Arrow table ref) and report them; no training."""
    import pyarrow as pa
    import ray

    tables = [ray.get(ref) for ref in data_refs]
    table = pa.concat_tables(tables) if tables else pa.table({})
    final = os.path.join(train_params["localPathPrefix"], "final")
    os.makedirs(final, exist_ok=True)
    summary = {
        "rows": table.num_rows,
        "blocks": len(tables),
        "columns": table.column_names,
        "first_row": table.slice(0, 1).to_pylist()[0] if table.num_rows else None,
        "train_params": sorted(train_params),
        "conf": sorted(conf),
    }
    with open(os.path.join(final, "echo_train.json"), "w") as f:
        json.dump(summary, f, default=str)
    yield {"rows": table.num_rows, "blocks": len(tables)}


sfft_train = sft_train
