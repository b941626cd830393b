"""Byzer-LLM scripts run as written: ``!byzerllm setup``, ``run command as LLM``, ``load``/``save``/``set``/
``select`` statements and ``--%chat`` cells.

Modules: ``byzer.lark`` (the grammar), :mod:`.parser` (script → statements), :mod:`.statements` (each
statement onto the public API), :mod:`.results`, :mod:`.chat_cell` (``--%chat``), :mod:`.presets` (``!byzerllm setup single``).
The IPython extension is :mod:`byzerllm_spark.notebook`; the command line ``byzerllm run``.
"""

from .parser import ScriptSyntaxError, parse
from .results import ScriptResult, StatementResult
from .statements import ScriptError, ScriptSession, ScriptWarning, run_script

__all__ = ["ScriptError", "ScriptResult", "ScriptSession", "ScriptSyntaxError", "ScriptWarning", "StatementResult",
           "parse", "run_script"]
