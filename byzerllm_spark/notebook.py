"""Byzer-LLM's notebook cells in Jupyter: ``%load_ext byzerllm_spark.notebook``.

Then a cell that starts with ``%%byzer`` runs as a Byzer-LLM script, and a cell whose first line is
``--%chat`` asks a deployed model (see :mod:`.script.chat_cell`)::

    %%byzer
    !byzerllm setup single;
    run command as LLM.`` where action="infer" and pretrainedModelType="custom/auto" and udfName="chat";
    select chat(llm_param(map('instruction', 'What is the capital of France?'))) as a as t1;

All cells of a kernel share one :class:`~.script.ScriptSession` (conf, ``set`` variables, models,
conversations): ``byzerllm_spark.notebook.session()``. Each cell prints what its statements did and
shows the rows of its last ``select`` (20 at most); long work shows progress bars (widgets).
"""

from __future__ import annotations

from typing import Any

from .script import ScriptError, ScriptSession
from .script.chat_cell import is_chat_cell

#: Rows of a cell's last select shown under the cell.
SHOW_ROWS = 20
_state: dict[str, Any] = {"session": None}


def session() -> ScriptSession:
    """The kernel's script session (created on first use)."""
    if _state["session"] is None:
        _state["session"] = ScriptSession()
    return _state["session"]


def run_cell(text: str) -> Any:
    """Run a cell's text and display what it did; returns the last statement's value."""
    from IPython.display import Markdown, display

    from .script.parser import Select

    try:
        result = session().run(text)
    except ScriptError as exc:
        for done in exc.completed:
            print(f"line {done.statement.line}: {done.summary}")
        raise
    if len(result) == 1 and is_chat_cell(text):
        display(Markdown(result[0].value))
        return None
    for item in result:
        print(f"line {item.statement.line}: {item.summary}")
    last = result.last
    if last is not None and isinstance(last.statement, Select):
        display(last.value.limit(SHOW_ROWS).toPandas())
    return None


def _byzer(line: str, cell: str) -> None:
    run_cell(cell)


def _chat_cells(lines: list[str]) -> list[str]:
    """IPython input transformer: a ``--%chat`` cell (not Python) becomes a call of the ``byzer`` magic."""
    text = "".join(lines)
    if is_chat_cell(text):
        return [f"get_ipython().run_cell_magic('byzer', '', {text!r})\n"]
    return lines


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext byzerllm_spark.notebook``: registers ``%%byzer`` and ``--%chat`` cells."""
    ipython.register_magic_function(_byzer, magic_kind="cell", magic_name="byzer")
    if _chat_cells not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(_chat_cells)


def unload_ipython_extension(ipython: Any) -> None:
    if _chat_cells in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(_chat_cells)
