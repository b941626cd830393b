"""Byzer-LLM's ``--%chat`` notebook cell: a question to a deployed model, the conversation kept per model.

    --%chat
    --%model=llama2_chat
    --%system_msg=You are a helpful assistant. Think it over and answer the user question correctly.
    --%user_role=User
    --%assistant_role=Assistant
    --%output=q1

    Recommend a film

The answer is the cell's result; the next ``--%chat`` cell for the same model sends the earlier turns as
``history``; ``--%output=q1`` registers the turn as the temporary view ``q1`` (columns ``model``,
``question``, ``answer``). ``--%system_msg``, the roles and the sampling options stay with the conversation
until a later cell changes them; ``--%new_conversation=true`` starts the model's conversation afresh.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from . import parser as p
from .results import StatementResult

#: ``--%key=value`` lines a chat cell takes (besides ``--%chat``), and what each is.
CHAT_KEYS = {
    "model": "the deployed model's name (its udfName)",
    "system_msg": "the system message",
    "user_role": "the name of the user's turns in the prompt",
    "assistant_role": "the name of the model's turns",
    "output": "a temporary view that gets (model, question, answer)",
    "temperature": "sampling temperature (0: greedy)",
    "max_length": "most new tokens of the answer",
    "top_p": "nucleus sampling",
    "new_conversation": "true: forget this model's earlier turns first",
}


def is_chat_cell(text: str) -> bool:
    """True when the text's first non-blank line is ``--%chat``."""
    for line in text.splitlines():
        if line.strip():
            return line.strip().lower() == "--%chat"
    return False


def parse_chat_cell(text: str) -> tuple[dict[str, str], str, int]:
    """(options, question, line of the question) of a ``--%chat`` cell.

    Raises:
        ConfigError: an unknown ``--%`` key (the valid ones listed), no ``--%model=``, or no question.
    """
    options: dict[str, str] = {}
    question: list[str] = []
    first_line = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not question and stripped.lower() == "--%chat":
            continue
        if not question and stripped.startswith("--%"):
            key, sep, value = stripped[3:].partition("=")
            key = key.strip()
            if key not in CHAT_KEYS:
                raise ConfigError(f"line {number}: unknown chat cell option --%{key}; the options are "
                                  f"{', '.join('--%' + k for k in CHAT_KEYS)}")
            options[key] = value.strip() if sep else "true"
            continue
        if not question and not stripped:
            continue
        if not question:
            first_line = number
        question.append(line)
    if not options.get("model"):
        raise ConfigError("a --%chat cell needs --%model=<name>: the deployed model to ask")
    text_question = "\n".join(question).strip()
    if not text_question:
        raise ConfigError("the --%chat cell has no question: write it after the --% lines")
    return options, text_question, first_line


def run_chat_cell(session: Any, text: str) -> StatementResult:
    """Ask the cell's model its question with the conversation so far; keep the turn.

    ``session`` is the :class:`~.statements.ScriptSession` whose conversations, options and Spark it uses.
    """
    from ..api.chat import chat

    options, question, line = parse_chat_cell(text)
    model = options["model"]
    if options.get("new_conversation", "false").lower() == "true":
        session.histories.pop(model, None)
        session.chat_options.pop(model, None)
    history = session.histories.setdefault(model, [])
    # system_msg, roles and sampling stay with the conversation until a later cell changes them
    kept = session.chat_options.setdefault(model, {})
    kept.update({k: v for k, v in options.items() if k not in ("model", "output", "new_conversation")})
    params: dict[str, Any] = {k: kept[k] for k in ("system_msg", "user_role", "assistant_role") if k in kept}
    for key, kind in (("temperature", float), ("top_p", float), ("max_length", int)):
        if key in kept:
            try:
                params[key] = kind(kept[key])
            except ValueError:
                bad = kept.pop(key)
                raise ConfigError(f"--%{key}={bad!r} is not valid: use a number") from None
    session.ray()
    answer = chat(model, question, history=list(history), **params)
    history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    output = options.get("output")
    if output:
        df = session.spark.createDataFrame([(model, question, answer)], "model string, question string, answer string")
        df.createOrReplaceTempView(output)
    statement = p.Statement(line=line, column=1, text=text)
    return StatementResult(statement, f"{model} answered ({len(history) // 2} turn(s) in this conversation)",
                           value=answer, table=output)
