"""byzerllm-spark: Byzer-LLM for PySpark.

Deploy LLMs into Ray Serve from the Spark driver, call them from Spark SQL and the DataFrame API,
finetune them on Spark tables and keep checkpoints as Delta model tables.

Importing this package is light: Ray, Spark, torch and the engines load when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access (PEP 562).
_EXPORTS = {
    "ModelTable": "model_table",
    "add_adapter": "api.deploy",
    "cancel_job": "finetune",
    "chat": "api.chat",
    "chat_batch": "api.chat",
    "clear_cache": "api.cache",
    "deploy": "api.deploy",
    "deploy_config": "api.deploy",
    "embed": "api.chat",
    "endpoint": "cluster",
    "exists": "api.deploy",
    "init": "cluster",
    "is_model_table": "model_table",
    "job_logs": "finetune",
    "job_output": "finetune",
    "job_status": "finetune",
    "last_query_stats": "sql.functions",
    "list_jobs": "finetune",
    "list_models": "api.deploy",
    "load_model_table": "model_table",
    "model_table_history": "model_table",
    "read_model_table": "model_table",
    "register_extract_function": "sql.tasks",
    "register_functions": "sql.functions",
    "register_model_function": "sql.functions",
    "register_task_functions": "sql.tasks",
    "resolve_table_uri": "model_table",
    "resume_job": "finetune",
    "run_script": "script",
    "ScriptSession": "script",
    "save_model_table": "model_table",
    "sfft": "finetune",
    "sft": "finetune",
    "shutdown": "cluster",
    "stat": "api.deploy",
    "stream_chat": "api.chat",
    "to_ray_dataset": "finetune",
    "track": "sql.functions",
    "undeploy": "api.deploy",
    "wait": "finetune",
    "workers": "api.deploy",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'byzerllm_spark' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
