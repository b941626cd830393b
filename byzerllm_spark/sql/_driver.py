"""The driver's side of the Spark functions, shared by the model functions (:mod:`.functions`) and the task
functions (:mod:`.tasks`): the check that executors can run them, and the accumulator of what a query cost."""

from __future__ import annotations

import threading
from typing import Any

from ..errors import ConfigError

_python_checked: set[int] = set()


def check_python(spark=None) -> None:
    """Make Spark's Python workers able to run the model functions, or say which setting to change.

    Spark starts its Python workers with ``python3`` from ``PATH`` unless ``PYSPARK_PYTHON`` or
    ``spark.pyspark.python`` says otherwise; a driver run as ``.venv/bin/python`` then gets
    ``No module named 'pyarrow'`` inside every UDF. A local session with neither set uses the driver's
    interpreter; on a cluster one tiny job checks, once per SparkContext, that the executors' Python
    imports ``byzerllm_spark`` and ``pyarrow``.

    Raises:
        ConfigError: the executors' Python lacks the packages; names the setting to change.
    """
    import os
    import sys

    from pyspark import SparkContext

    context = SparkContext._active_spark_context
    if context is None or id(context) in _python_checked:  # Spark Connect: the server's Python decides
        return
    conf = context.getConf()
    configured = os.environ.get("PYSPARK_PYTHON") or conf.get("spark.pyspark.python", None)
    if context.master.startswith("local"):
        if not configured and context.pythonExec != sys.executable:
            context.pythonExec = sys.executable  # read when each UDF is wrapped, so this takes effect now
        _python_checked.add(id(context))
        return

    def probe(_):
        import importlib.util
        import sys as executor_sys

        missing = [m for m in ("pyarrow", "byzerllm_spark") if importlib.util.find_spec(m) is None]
        return executor_sys.executable, missing

    def run_probe() -> tuple[str, list[str]]:
        try:
            return context.parallelize([0], 1).map(probe).first()
        except Exception as exc:
            return context.pythonExec, [f"a working pyspark worker ({str(exc).splitlines()[0][:200]})"]

    executable, missing = run_probe()
    if missing and not configured and context.pythonExec != sys.executable:
        # Nothing chose the executors' Python: the driver's own interpreter, where executors have the same
        # path (a shared image or file system), is what the user meant.
        default, context.pythonExec = context.pythonExec, sys.executable
        executable, missing = run_probe()
        if missing:
            context.pythonExec = default
    if missing:
        raise ConfigError(
            f"Spark's executors run Python {executable!r}, which lacks {', '.join(missing)}: the model functions "
            "cannot run there. Point them at an interpreter with byzerllm-spark installed on every executor: "
            "PYSPARK_PYTHON=/path/to/python in the driver's environment before its SparkSession starts, or "
            "spark-submit --conf spark.pyspark.python=/path/to/python (set in a SparkSession's builder, "
            "spark.pyspark.python does not reach the executors of a running driver)"
        )
    _python_checked.add(id(context))


_stats_lock = threading.Lock()
_stats: dict[str, Any] = {"context": None, "accumulator": None}


def _stats_accumulator():
    """The active SparkContext's accumulator of the model functions' counters (one per context), or None
    on Spark Connect, whose API has no accumulators."""
    from pyspark import SparkContext

    from .udf import QueryCounters

    context = SparkContext._active_spark_context
    if context is None:
        return None
    with _stats_lock:
        if _stats["context"] is not context:
            _stats.update(context=context, accumulator=context.accumulator({}, QueryCounters()))
        return _stats["accumulator"]
