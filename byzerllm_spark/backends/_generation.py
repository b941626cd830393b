"""OpenAI's sampling parameters for engines that do not have them built in (transformers' ``generate``):
``stop`` sequences, ``presence_penalty`` / ``frequency_penalty`` / ``logit_bias``, and ``logprobs`` /
``top_logprobs``, with OpenAI's meaning:

- ``stop``: up to 4 strings; the answer ends before the first one that appears and does not contain it.
- ``presence_penalty`` / ``frequency_penalty`` (-2..2): at each step, a token's logit is lowered by
  ``presence_penalty`` if it was generated before and by ``frequency_penalty`` times its count so far
  (OpenAI's formula, over the generated tokens only). ``logit_bias``: ``{token id: bias}``, added to the
  logits (-100..100; -100 bans a token).
- ``logprobs``: the log-probability of each generated token under the model (log-softmax of its raw
  logits, before temperature and penalties), and the ``top_logprobs`` (0..20) most likely tokens of each
  step, as OpenAI's chat ``logprobs.content`` list of ``{token, logprob, bytes, top_logprobs}``.
- ``tools``: rendered by a chat template written for them; the model's ``<tool_call>{...}</tool_call>``
  blocks become OpenAI's ``tool_calls``.

Torch is passed in, never imported here (``import byzerllm_spark`` imports no engine).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from ..errors import RequestRefusedError, bad_value

#: OpenAI's limits.
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20


def _loads(value: Any) -> Any:
    """A Spark map carries lists and objects as JSON text."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def stop_sequences(value: Any) -> list[str]:
    """The request's ``stop`` as a list of non-empty strings ([] when not set).

    Raises:
        RequestRefusedError: not a string or a list of at most 4 strings.

    Example:
        >>> stop_sequences(["Paris", "\\n"])
        ['Paris', '\\n']
    """
    value = _loads(value)
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) for s in stops):
        raise RequestRefusedError(bad_value("stop", value, f"pass a string or a list of up to {MAX_STOP} strings"),
                                  param="stop")
    return [s for s in stops if s]


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to (not including) the earliest stop sequence, and whether one was found."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


class TextStream:
    """The streamed form of an answer that a whole answer gets as ``cut_at_stop(text)[0].strip()``: pieces in,
    text out, so the pieces sent join to exactly that. Leading whitespace is dropped, trailing whitespace and
    text that could still begin a stop sequence are held back until the next piece decides. :meth:`feed`
    returns ``(text to send, stopped)``; :meth:`finish` the rest once the engine has ended."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        self.text += piece
        view = self.text.lstrip()
        cut, stopped = cut_at_stop(view, self.stops)
        end = len((cut if stopped else view[:max(0, len(view) - self.keep)]).rstrip())
        return self._send(view, end), stopped

    def finish(self) -> str:
        view = self.text.lstrip()
        return self._send(view, len(cut_at_stop(view, self.stops)[0].rstrip()))

    def _send(self, view: str, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = view[self.sent:end], end
        return out


def _float(key: str, value: Any, lo: float, hi: float) -> float:
    try:
        number = float(value)
        if isinstance(value, bool) or not lo <= number <= hi:
            raise ValueError
    except (TypeError, ValueError):
        raise RequestRefusedError(bad_value(key, value, f"pass a number from {lo:g} to {hi:g}"), param=key) from None
    return number


def penalties(generation: dict[str, Any], vocab_size: int) -> tuple[float, float, dict[int, float]]:
    """``(presence_penalty, frequency_penalty, logit_bias)`` of a request, checked (0, 0, {} when not set).

    Raises:
        RequestRefusedError: a value out of OpenAI's range, or a ``logit_bias`` key that is no token id.
    """
    presence = _float("presence_penalty", generation.get("presence_penalty") or 0, -2.0, 2.0)
    frequency = _float("frequency_penalty", generation.get("frequency_penalty") or 0, -2.0, 2.0)
    raw = _loads(generation.get("logit_bias")) or {}
    if not isinstance(raw, dict):
        raise RequestRefusedError(bad_value("logit_bias", raw, 'pass an object {"<token id>": bias}'),
                                  param="logit_bias")
    bias: dict[int, float] = {}
    for key, value in raw.items():
        token = int(key) if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()) else -1
        if not 0 <= token < vocab_size:
            raise RequestRefusedError(bad_value("logit_bias", {key: value}, f"keys are token ids from 0 to "
                                                f"{vocab_size - 1} (this model's vocabulary)"), param="logit_bias")
        bias[token] = _float("logit_bias", value, -100.0, 100.0)
    return presence, frequency, bias


def top_logprobs(generation: dict[str, Any]) -> int | None:
    """How many alternatives per token the request wants (0..20), or None when it asks for no logprobs."""
    if generation.get("logprobs") in (None, False, "false", "", 0) and generation.get("top_logprobs") is None:
        return None
    value = generation.get("top_logprobs") or 0
    try:
        k = int(value)
        if isinstance(value, bool) or not 0 <= k <= MAX_TOP_LOGPROBS or k != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise RequestRefusedError(bad_value("top_logprobs", value, f"pass an integer from 0 to {MAX_TOP_LOGPROBS}"),
                                  param="top_logprobs") from None
    return k


class PenaltyProcessor:
    """A ``generate`` logits processor for one group of rows sharing ``presence`` / ``frequency`` / ``bias``
    (OpenAI's formula over each row's generated tokens; the prompt is left out)."""

    def __init__(self, presence: float, frequency: float, bias: dict[int, float], torch) -> None:
        self.presence, self.frequency, self.bias, self.torch = presence, frequency, bias, torch
        self.start: int | None = None

    def __call__(self, input_ids, scores):
        torch = self.torch
        if self.start is None:
            self.start = input_ids.shape[1]  # the (padded) prompt: every row's answer starts here
        generated = input_ids[:, self.start:]
        if generated.shape[1] and (self.presence or self.frequency):
            counts = torch.zeros_like(scores)
            counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores = scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)
        if self.bias:
            ids = torch.tensor(list(self.bias), device=scores.device)
            scores[:, ids] += torch.tensor(list(self.bias.values()), device=scores.device, dtype=scores.dtype)
        return scores


def token_logprobs(tokenizer, torch, step_logits: list, tokens: list[int], k: int) -> list[dict[str, Any]]:
    """OpenAI's chat ``logprobs.content`` for one row: ``step_logits[j]`` is the row's raw logits (1-D) at
    step ``j``, ``tokens[j]`` the token chosen there."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    out = []
    for logits, token in zip(step_logits, tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)
        item = entry(token, float(logp[token]))
        alternatives = []
        if k:
            values, ids = torch.topk(logp, k)
            alternatives = [entry(int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        item["top_logprobs"] = alternatives
        out.append(item)
    return out


class SeededSampler:
    """Sampling with one random generator per row, seeded with that row's ``seed``, inside one batched
    ``generate`` call: the last logits processor applies the group's temperature / top-k / top-p (transformers'
    own warpers), draws each row's token from its own generator, and leaves only that token possible, so
    that greedy decoding takes it. A row's draws then never depend on the rows beside it: the same request
    gives the same answer alone or batched (one shared generator would hand each row different draws
    depending on its neighbours)."""

    def __init__(self, seeds: list[int], warpers: list, torch, device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        self.warpers, self.torch = warpers, torch

    def __call__(self, input_ids, scores):
        torch = self.torch
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        out = torch.full_like(scores, float("-inf"))
        for i, generator in enumerate(self.generators):
            token = torch.multinomial(probs[i], 1, generator=generator)
            out[i, token] = 0.0
        return out


#: How chat templates written for tools (Hermes, Qwen 2.5, SmolLM3...) have the model write a call:
#: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def tool_definitions(generation: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request's ``tools`` (OpenAI's ``[{"type": "function", "function": {...}}]``), or None.

    Raises:
        RequestRefusedError: not a list of function tools, or a ``tool_choice`` other than ``auto`` / ``none``
            (a model can be asked to call, not made to).
    """
    tools = _loads(generation.get("tools"))
    if not tools:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function"
                                              and isinstance(t.get("function"), dict) for t in tools):
        raise RequestRefusedError(bad_value("tools", f"<{type(tools).__name__}>", 'pass [{"type": "function", '
                                            '"function": {"name": ..., "parameters": {...}}}, ...]'), param="tools")
    choice = _loads(generation.get("tool_choice"))
    if choice not in (None, "auto", "none"):
        raise RequestRefusedError(bad_value("tool_choice", choice, "this backend lets the model choose: pass 'auto' "
                                            "(or 'none', or leave it out)"), param="tool_choice")
    return tools


def tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """The answer's text without its ``<tool_call>`` blocks, and the calls as OpenAI's ``tool_calls``
    (``arguments`` as JSON text). A block that is not JSON with a ``name`` stays in the text.

    Example:
        >>> tool_calls('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')[1][0]["function"]
        {'name': 'f', 'arguments': '{"x": 1}'}
    """
    calls: list[dict[str, Any]] = []

    def take(match: "re.Match") -> str:
        try:
            call = json.loads(match.group(1))
        except ValueError:
            return match.group(0)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return match.group(0)
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": arguments if isinstance(arguments, str)
                                   else json.dumps(arguments, ensure_ascii=False)}})
        return ""

    rest = _TOOL_CALL.sub(take, text)
    return (rest.strip() if calls else text), calls
