"""Conversation formats: Alpaca, Moss, OpenAI ``messages`` and ShareGPT rows → chat turns.

Every format is normalised to one shape, a list of ``{"role": ..., "content": ...}`` turns (roles
``system``, ``user``, ``assistant``), so the model's own chat template builds the training text and
the loss mask is the same for all of them:

========  =========================================================================================
format    columns (Byzer-LLM's finetune docs for the first two)
========  =========================================================================================
alpaca    ``instruction string, input string, output string, history array<array<string>>``
          (``input`` and ``history`` optional; ``history`` is ``[[question, answer], ...]``)
moss      ``conversation array<struct<human:string, assistant:string>>``
openai    ``messages array<struct<role:string, content:string>>``
sharegpt  ``conversations array<struct<from:string, value:string>>`` (``human``/``gpt``/``system``)
========  =========================================================================================

:func:`detect_format` picks the format from column names, on the driver, before anything runs.
:func:`normalise` turns one row into turns or raises :class:`FormatError` naming the expected
columns and the row. :func:`training_example` renders turns with a tokenizer's chat template and
masks every token that is not an assistant answer with -100.

Nothing heavy is imported here: the tokenizer is passed in.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

from ..errors import ConfigError

#: format name → (required columns, optional columns)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alpaca": (("instruction", "output"), ("input", "history", "system")),
    "moss": (("conversation",), ("system",)),
    "openai": (("messages",), ()),
    "sharegpt": (("conversations",), ("system",)),
}
#: Label of tokens that carry no loss (PyTorch's ``CrossEntropyLoss`` ``ignore_index``).
IGNORE_INDEX = -100

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
_OPENAI_ROLES = {"system", "user", "assistant"}


class FormatError(ConfigError):
    """The training table is not in a known format, or one of its rows is malformed."""


def expected_columns() -> str:
    """The accepted formats and their columns, for error messages."""
    parts = []
    for name, (required, optional) in FORMATS.items():
        cols = ", ".join(required) + (f" (optional: {', '.join(optional)})" if optional else "")
        parts.append(f"{name}: {cols}")
    return "; ".join(parts)


def detect_format(columns: Iterable[str], fmt: str | None = "auto") -> str:
    """The format of a table with these column names.

    Args:
        columns: the table's column names.
        fmt: ``"auto"``/None to detect, or a format name to check the columns against.

    Returns:
        One of ``alpaca``, ``moss``, ``openai``, ``sharegpt``.

    Raises:
        FormatError: no format matches (or the named one's columns are missing), listing the
            columns each format needs.

    Example:
        >>> detect_format(["instruction", "input", "output"])
        'alpaca'
    """
    cols = set(columns)
    if fmt not in (None, "auto"):
        if fmt not in FORMATS:
            raise FormatError(f"format={fmt!r} is not known: use 'auto' or one of {', '.join(FORMATS)}")
        missing = [c for c in FORMATS[fmt][0] if c not in cols]
        if missing:
            raise FormatError(
                f"format={fmt!r} needs the columns {', '.join(FORMATS[fmt][0])}, but the table lacks "
                f"{', '.join(missing)} (its columns: {', '.join(sorted(cols)) or 'none'})"
            )
        return fmt
    # Most specific first: an OpenAI table may also carry an 'output' column, say.
    for name in ("openai", "sharegpt", "moss", "alpaca"):
        if all(c in cols for c in FORMATS[name][0]):
            return name
    raise FormatError(
        "the training table has no recognised columns (its columns: "
        f"{', '.join(sorted(cols)) or 'none'}); expected one of the formats: {expected_columns()}"
    )


def format_columns(fmt: str, columns: Iterable[str]) -> list[str]:
    """The columns of ``fmt`` present in the table: what the executors need to send."""
    required, optional = FORMATS[fmt]
    cols = set(columns)
    return list(required) + [c for c in optional if c in cols]


def _text(value: Any, what: str) -> str:
    if value is None:
        raise ValueError(f"{what} is null")
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, not a string")
    return value


def _maybe_json(value: Any) -> Any:
    # JSON text in a string column is accepted for the nested formats (a CSV or Hive table).
    if isinstance(value, str):
        return json.loads(value)
    return value


def _get(item: Any, key: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(key)
    return getattr(item, key, None)


def _system_turns(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The row's ``system`` column as the first turn, when it has one."""
    if row.get("system"):
        return [{"role": "system", "content": _text(row["system"], "system")}]
    return []


def _turn_items(row: Mapping[str, Any], column: str) -> list:
    """A nested-format column's turns (a list, or its JSON text); empty is an error."""
    items = _maybe_json(row.get(column))
    if not items:
        raise ValueError(f"{column} is empty")
    return items


def _normalise_alpaca(row: Mapping[str, Any]) -> list[dict[str, str]]:
    turns = _system_turns(row)
    history = _maybe_json(row.get("history")) or []
    for i, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"history[{i}] is not a [question, answer] pair")
        turns.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        turns.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    instruction = _text(row.get("instruction"), "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"input is {type(extra).__name__}, not a string")
    # Alpaca's convention: the input is context appended to the instruction.
    user = f"{instruction}\n{extra}" if extra and extra.strip() else instruction
    turns.append({"role": "user", "content": user})
    turns.append({"role": "assistant", "content": _text(row.get("output"), "output")})
    return turns


def _normalise_moss(row: Mapping[str, Any]) -> list[dict[str, str]]:
    turns = _system_turns(row)
    conversation = _turn_items(row, "conversation")
    for i, turn in enumerate(conversation):
        turns.append({"role": "user", "content": _text(_get(turn, "human"), f"conversation[{i}].human")})
        turns.append({"role": "assistant", "content": _text(_get(turn, "assistant"), f"conversation[{i}].assistant")})
    return turns


def _normalise_openai(row: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = _turn_items(row, "messages")
    turns = []
    for i, msg in enumerate(messages):
        role = _get(msg, "role")
        if role not in _OPENAI_ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}; use one of {', '.join(sorted(_OPENAI_ROLES))}")
        turns.append({"role": role, "content": _text(_get(msg, "content"), f"messages[{i}].content")})
    return turns


def _normalise_sharegpt(row: Mapping[str, Any]) -> list[dict[str, str]]:
    turns = _system_turns(row)
    conversations = _turn_items(row, "conversations")
    for i, msg in enumerate(conversations):
        who = _get(msg, "from")
        role = _SHAREGPT_ROLES.get(str(who).lower()) if who is not None else None
        if role is None:
            raise ValueError(f"conversations[{i}].from is {who!r}; use human/gpt/system")
        turns.append({"role": role, "content": _text(_get(msg, "value"), f"conversations[{i}].value")})
    return turns


_NORMALISERS = {
    "alpaca": _normalise_alpaca,
    "moss": _normalise_moss,
    "openai": _normalise_openai,
    "sharegpt": _normalise_sharegpt,
}


def _check_turns(turns: Sequence[Mapping[str, str]]) -> None:
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError("it has no assistant turn to learn from")
    if not any(t["role"] == "user" for t in turns):
        raise ValueError("it has no user turn")


def normalise(row: Mapping[str, Any], fmt: str) -> list[dict[str, str]]:
    """One row of format ``fmt`` → chat turns ``[{"role", "content"}, ...]``.

    Raises:
        FormatError: the row does not fit ``fmt``; the message names the expected columns, what is
            wrong and the row itself.

    Example:
        >>> normalise({"instruction": "2+2?", "output": "4"}, "alpaca")
        [{'role': 'user', 'content': '2+2?'}, {'role': 'assistant', 'content': '4'}]
    """
    try:
        turns = _NORMALISERS[fmt](row)
        _check_turns(turns)
        return turns
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FormatError(bad_row_message(fmt, row, str(exc))) from None


def bad_row_message(fmt: str, row: Any, reason: str, index: int | None = None) -> str:
    required, optional = FORMATS[fmt]
    shown = json.dumps(row, default=str, ensure_ascii=False)
    if len(shown) > 300:
        shown = shown[:300] + "..."
    where = f"row {index}" if index is not None else "a row"
    return (
        f"{where} does not fit the {fmt} format ({reason}): {shown}. The {fmt} format needs "
        f"{', '.join(required)}" + (f" (optional: {', '.join(optional)})" if optional else "")
        + f"; all formats: {expected_columns()}"
    )


def training_text(tokenizer: Any, turns: Sequence[Mapping[str, str]]) -> str:
    """The text the model is trained on: the turns rendered by the tokenizer's chat template."""
    return tokenizer.apply_chat_template(list(turns), tokenize=False)


def assistant_spans(tokenizer: Any, turns: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The training text and the character spans of the assistant answers in it.

    Each answer's span runs from the end of the prompt rendered for it (``add_generation_prompt``)
    to the end of the conversation rendered up to it, so it includes the template's end-of-turn
    marker: the model learns to stop.
    """
    full = training_text(tokenizer, turns)
    spans: list[tuple[int, int]] = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(list(turns[:i]), tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(list(turns[: i + 1]), tokenize=False)
        if not full.startswith(upto) or not upto.startswith(prompt):
            # A template that rewrites earlier turns (some drop past reasoning): locate the answer.
            start = full.find(turn["content"], spans[-1][1] if spans else 0)
            if start < 0:
                raise FormatError("the chat template does not reproduce an assistant answer verbatim")
            spans.append((start, start + len(turn["content"])))
            continue
        spans.append((len(prompt), len(upto)))
    return full, spans


def training_example(tokenizer: Any, turns: Sequence[Mapping[str, str]], max_seq_length: int) -> dict[str, list[int]]:
    """Token ids and labels for one conversation; labels are -100 outside assistant answers.

    Truncated to ``max_seq_length`` tokens (from the end of the text, so the prompt stays).
    """
    text, spans = assistant_spans(tokenizer, turns)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                    max_length=max_seq_length)
    ids = list(enc["input_ids"])
    labels = []
    for (start, end), token in zip(enc["offset_mapping"], ids):
        inside = any(start < s_end and end > s_start for s_start, s_end in spans) if end > start else False
        labels.append(token if inside else IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels}


def arrow_normaliser(fmt: str):
    """A ``transform`` for the data servers: a record batch of ``fmt`` rows → ``messages`` turns.

    Runs on Spark's executors. Returns ``(batch, None)``, or ``(partial batch, (index, message))``
    at the first row that does not fit.
    """

    def transform(batch):
        import pyarrow as pa

        turn_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
        out, bad = [], None
        for i, row in enumerate(batch.to_pylist()):
            try:
                out.append(normalise(row, fmt))
            except FormatError as exc:
                bad = (i, str(exc))
                break
        return pa.RecordBatch.from_arrays([pa.array(out, type=turn_type)], names=["messages"]), bad

    return transform
