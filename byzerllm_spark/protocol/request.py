"""The request every caller sends: ``bls.chat``, the Spark functions and the JVM bridge.

A request is a flat JSON object with the keys of ``llm_param(map(...))`` (Byzer-LLM's SQL functions). Values may be
strings (Spark maps are ``map<string,string>``) or typed JSON values; both parse the same way. The
parsed form is a :class:`ChatRequest`; a row that does not parse gets a :class:`RequestError` that
names the key, the bad value and the fix, without failing the rows beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import orjson

from ..errors import RequestParseError, bad_value
from .structured import ResponseFormat, parse_response_format

DEFAULT_MAX_LENGTH = 1024
DEFAULT_TOP_P = 0.95
DEFAULT_TEMPERATURE = 0.1

#: Keys a request may carry besides ``generation.<name>`` / ``gen.<name>``.
REQUEST_KEYS = (
    "instruction",
    "history",
    "system_msg",
    "user_role",
    "assistant_role",
    "max_length",
    "max_tokens",
    "top_p",
    "top_k",
    "temperature",
    "messages",
    "request_id",
    "response_format",
    "adapter",
)
_REQUEST_KEY_SET = frozenset(REQUEST_KEYS)


@dataclass(slots=True)
class ChatRequest:
    """One parsed chat request.

    ``max_length`` is the most new tokens to generate (Byzer's name for it). ``generation`` holds
    the ``generation.*`` keys with the prefix stripped: they reach a plugin's ``stream_chat`` as
    keyword arguments (``generation.image`` arrives as ``image``). ``response_format`` is the parsed
    structured-output request (:mod:`.structured`), None for plain text. ``adapter`` names the LoRA
    adapter of the deployment that answers this row (``deploy(lora_adapters=...)``), None: the base model.
    """

    instruction: str
    history: tuple = ()
    system_msg: str | None = None
    user_role: str | None = None
    assistant_role: str | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    top_p: float = DEFAULT_TOP_P
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int | None = None
    generation: dict = field(default_factory=dict)
    response_format: ResponseFormat | None = None
    #: False when ``messages`` ended without a user turn (only system or assistant turns, as OpenAI allows):
    #: ``instruction`` is then empty and no user turn is added; the model answers the conversation as it stands.
    final_user_turn: bool = True
    adapter: str | None = None

    def sampling(self) -> dict[str, Any]:
        """OpenAI-style sampling arguments (``max_tokens``, ``temperature``, ``top_p``, ``top_k``)."""
        out: dict[str, Any] = {"max_tokens": self.max_length, "temperature": self.temperature, "top_p": self.top_p}
        if self.top_k is not None:
            out["top_k"] = self.top_k
        return out

    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style messages: system, history turns, then the instruction as the user turn."""
        out: list[dict[str, str]] = []
        if self.system_msg:
            out.append({"role": "system", "content": self.system_msg})
        out.extend(self.history)
        if self.final_user_turn:
            out.append({"role": "user", "content": self.instruction})
        return out


def _number(key: str, value: Any, cast: type, lo: float, hi: float | None) -> Any:
    kind = "a number" if cast is float else "an integer"
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number) or (cast is int and not number.is_integer()):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise RequestParseError(bad_value(key, _short(value), f"pass {kind}, e.g. {key}='{max(lo, 1):g}'")) from None
    if number < lo or (hi is not None and number > hi):
        upper = f" and <= {hi:g}" if hi is not None else ""
        raise RequestParseError(bad_value(key, value, f"use {kind} >= {lo:g}{upper}"))
    return int(number) if cast is int else number


def _short(value: Any) -> Any:
    """A value fit for an error message: nested or long values are cut (their repr could be huge or deep)."""
    if isinstance(value, (str, bytes)):
        return value[:80]
    if isinstance(value, (list, tuple, dict)):
        return f"<{type(value).__name__} of {len(value)}>"
    return value


def _text(key: str, value: Any) -> str:
    """A text field: strings as they are, numbers and booleans as text, null as ''; nothing nested."""
    if type(value) is str:
        return value
    if value is None:
        return ""
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise RequestParseError(bad_value(key, _short(value), "pass text (a string)"))


def _adapter(value: Any) -> str | None:
    """A row's ``adapter``: a registered adapter's name; '' means the base model, as a missing key does."""
    if type(value) is not str:
        raise RequestParseError(bad_value("adapter", _short(value), "pass the name of a LoRA adapter of the "
                                          "deployment (deploy(lora_adapters=...)), or leave it out for the base model"))
    return value.strip() or None


def _turns(key: str, value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RequestParseError(
                bad_value(key, value[:80], 'pass a JSON list like [{"role":"user","content":"hi"}]')
            ) from None
    if not isinstance(value, (list, tuple)):
        raise RequestParseError(bad_value(key, value, 'pass a list of {"role": ..., "content": ...} turns'))
    turns = []
    for i, turn in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(turn, Mapping) and "role" in turn and "content" in turn:
            turns.append({"role": _text(f"{where}.role", turn["role"]), "content": _text(f"{where}.content", turn["content"])})
        elif isinstance(turn, (list, tuple)) and len(turn) == 2:
            # Byzer/Alpaca style history: [[question, answer], ...]
            turns.append({"role": "user", "content": _text(f"{where}[0]", turn[0])})
            turns.append({"role": "assistant", "content": _text(f"{where}[1]", turn[1])})
        else:
            raise RequestParseError(
                bad_value(where, _short(turn), 'each turn is {"role": ..., "content": ...} or a [question, answer] pair')
            )
    return turns


def parse_request(params: Any, defaults: Mapping[str, Any] | None = None) -> ChatRequest | None:
    """Parse one request (a dict or its JSON text) into a :class:`ChatRequest`.

    A request whose ``instruction`` is present but null (a null column inside ``llm_param``) parses
    to None: its answer is null, not an error.

    Args:
        params: the ``llm_param`` map, as a dict or as JSON text.
        defaults: deployment-level generation defaults (``generation.*`` from ``infer_params``).

    Raises:
        RequestParseError: a key is unknown or a value is malformed; the message says how to fix it.

    Example:
        >>> parse_request('{"instruction": "hi", "temperature": "0"}').temperature
        0.0
    """
    if isinstance(params, (str, bytes)):
        try:
            params = orjson.loads(params)
        except (orjson.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestParseError(f"the request is not valid JSON ({exc}); build it with llm_param(map(...))") from None
    if type(params) is not dict and not isinstance(params, Mapping):  # the exact check first: it is cheap
        raise RequestParseError(
            bad_value("request", _short(params), "pass a map such as llm_param(map('instruction', q)) or a dict")
        )
    generation: dict[str, Any] = {}
    # This runs once per row on the serving path: the common case (only known keys, no
    # deployment defaults) takes the request dict as it is.
    if not defaults and _REQUEST_KEY_SET.issuperset(params.keys()):
        values: Mapping[str, Any] = params
    else:
        values = {}
        if defaults:
            for key, value in defaults.items():
                if key in _REQUEST_KEY_SET:
                    values[key] = value
                else:
                    generation[key] = value
        for key, value in params.items():
            if key in _REQUEST_KEY_SET:
                values[key] = value
            elif key.startswith("generation."):
                generation[key[11:]] = value
            elif key.startswith("gen."):
                generation[key[4:]] = value
            else:
                raise RequestParseError(
                    f"unknown request key {key!r}: use one of {', '.join(REQUEST_KEYS)}, or pass a "
                    f"model-specific value as 'generation.{key}'"
                )

    instruction = values.get("instruction")
    history: tuple = ()
    system_msg = values.get("system_msg")
    messages = values.get("messages")
    final_user_turn = True
    if messages is not None:
        if instruction is not None:
            raise RequestParseError("pass either 'instruction' (with 'history') or 'messages', not both")
        turns = _turns("messages", messages)
        if not turns:
            raise RequestParseError('\'messages\' is empty: pass at least one turn, e.g. [{"role": "user", "content": "hi"}]')
        final_user_turn = turns[-1]["role"] == "user"
        past = []
        for turn in turns[:-1] if final_user_turn else turns:
            if turn["role"] == "system":
                system_msg = turn["content"] if system_msg is None else system_msg + "\n" + turn["content"]
            else:
                past.append(turn)
        history = tuple(past)
        instruction = turns[-1]["content"] if final_user_turn else ""
    elif values.get("history") is not None:
        history = tuple(_turns("history", values["history"]))
    if instruction is None and "instruction" in values:
        return None  # llm_param(map('instruction', NULL)): a null row stays null
    if instruction is None:
        raise RequestParseError(
            "the request has no 'instruction': add it, e.g. llm_param(map('instruction', q))"
        )
    request = ChatRequest(instruction if type(instruction) is str else _text("instruction", instruction), history,
                          generation=generation)
    if not final_user_turn:
        request.final_user_turn = False
    if system_msg is not None:
        request.system_msg = _text("system_msg", system_msg)
    # This runs once per row: only the keys present cost anything (most rows carry one to four).
    for key, value in values.items():
        if value is not None:
            setter = _SETTERS.get(key)
            if setter is not None:
                setter(request, value)
    if values.get("max_tokens") is not None:  # the OpenAI name wins over Byzer's max_length
        request.max_length = _number("max_tokens", values["max_tokens"], int, 1, None)
    if generation and "response_format" in generation:  # generation.response_format: the same request
        value = generation.pop("response_format")
        if request.response_format is None:
            request.response_format = parse_response_format(value)
    return request


_SETTERS = {
    "user_role": lambda r, v: setattr(r, "user_role", _text("user_role", v)),
    "assistant_role": lambda r, v: setattr(r, "assistant_role", _text("assistant_role", v)),
    "max_length": lambda r, v: setattr(r, "max_length", _number("max_length", v, int, 1, None)),
    "top_p": lambda r, v: setattr(r, "top_p", _number("top_p", v, float, 0.0, 1.0)),
    "temperature": lambda r, v: setattr(r, "temperature", _number("temperature", v, float, 0.0, 2.0)),
    "top_k": lambda r, v: setattr(r, "top_k", _number("top_k", v, int, 1, None)),
    "response_format": lambda r, v: setattr(r, "response_format", parse_response_format(v)),
    "adapter": lambda r, v: setattr(r, "adapter", _adapter(v)),
}
"""Per-key conversions of the optional request fields (``system_msg`` and ``max_tokens`` are
handled in :func:`parse_request`: they combine with other keys)."""


def build_params(instruction: str | None = None, **params: Any) -> dict[str, Any]:
    """The request dict that ``bls.chat`` sends; the Spark functions send the same keys.

    ``generation_image=...`` style keyword names map to ``generation.image``; pass a dict key
    ``"generation.image"`` through ``**{"generation.image": url}`` as well.
    """
    out: dict[str, Any] = {}
    if instruction is not None:
        out["instruction"] = instruction
    for key, value in params.items():
        if value is None:
            continue
        if key.startswith("generation_"):
            key = "generation." + key[len("generation_"):]
        out[key] = value
    return out
