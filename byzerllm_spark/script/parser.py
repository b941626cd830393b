"""Byzer-LLM scripts → statements: the grammar in ``byzer.lark``, parsed with Lark.

:func:`parse` turns a script into a list of :class:`Statement` objects (one subclass per kind) and
reports a script that does not parse with its line, column and the statement's text. Nothing is
run here: :mod:`.statements` runs them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..errors import ConfigError

#: Statement kinds a script may hold, as the errors list them.
SUPPORTED_KINDS = (
    "!byzerllm setup / !python conf", "!byzerllm model remove", "run ... as LLM.``", "load", "save", "set", "select",
)
#: Full-width punctuation typed with a Chinese input method, outside strings, read as its ASCII form.
_FULL_WIDTH = {"，": ",", "（": "(", "）": ")", "＝": "=", "：": ":"}


class ScriptSyntaxError(ConfigError):
    """A script that does not parse: ``line`` and ``column`` (1-based) say where."""

    def __init__(self, message: str, *, line: int, column: int, source: str) -> None:
        lines = source.splitlines() or [""]
        shown = redact_text(lines[line - 1]) if 0 < line <= len(lines) else ""
        super().__init__(f"line {line}, column {column}: {message}\n    {shown}\n    {' ' * (column - 1)}^")
        self.line, self.column = line, column


@dataclass(frozen=True)
class Statement:
    """One statement: where it starts (1-based line and column) and its source text.

    Reprs never show the text or parameter values that may hold secrets (``apiKey``, ``saas.api_key``).
    """

    line: int
    column: int
    text: str = field(repr=False)

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()


@dataclass(frozen=True)
class Command(Statement):
    """``!byzerllm setup "k=v"`` → words ``("byzerllm", "setup", "k=v")`` (quotes removed)."""

    words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Run(Statement):
    """``run <table> as <module>.`<path>` where ... [as <output>]``."""

    table: str = ""
    module: str = ""
    path: str = ""
    params: dict[str, str] = field(default_factory=dict, repr=False)
    output: str | None = None


@dataclass(frozen=True)
class Load(Statement):
    """``load <format>.`<path>` where ... as <table>``."""

    format: str = ""
    path: str = ""
    params: dict[str, str] = field(default_factory=dict, repr=False)
    table: str = ""


@dataclass(frozen=True)
class Save(Statement):
    """``save [overwrite|append|errorIfExists|ignore] <table> as <format>.`<path>` where ...``."""

    mode: str = "overwrite"
    table: str = ""
    format: str = ""
    path: str = ""
    params: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Set(Statement):
    """``set <name>=<value> [where type="text"]``."""

    name: str = ""
    value: str = field(default="", repr=False)
    params: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Select(Statement):
    """``select ... as <table>``: ``sql`` is the statement without its final ``as <table>``.

    ``fixes`` lists what was read leniently (full-width punctuation, a trailing comma before ``)``).
    """

    sql: str = ""
    table: str = ""
    fixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Other(Statement):
    """A statement of a kind this library does not run (its first word is ``word``)."""

    word: str = ""


@functools.lru_cache(maxsize=1)
def _lark():
    from lark import Lark

    grammar = resources.files(__package__).joinpath("byzer.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=False)


def parse(text: str) -> list[Statement]:
    """Parse a Byzer-LLM script.

    Args:
        text: the script (str): statements ending with ``;``, ``--`` and ``/* */`` comments.

    Returns:
        The statements in order (list of :class:`Statement` subclasses).

    Raises:
        ScriptSyntaxError: the script does not parse (line, column, the line and a caret); an
            unclosed quote, a missing ``;``, a ``select`` without ``as <table>``, a repeated key.

    Example:
        >>> [s.kind for s in parse('!byzerllm setup single; select 1 as a as t;')]
        ['command', 'select']
    """
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

    if not isinstance(text, str):
        raise ConfigError(f"a script is text (str), not {type(text).__name__}")
    try:
        tree = _lark().parse(text)
    except UnexpectedCharacters as exc:
        pos, line, column = exc.pos_in_stream, exc.line, exc.column
        char = text[pos] if pos < len(text) else ""
        if char in "'\"`":
            # an unclosed triple quote lexes as an empty string first: point at the opening triple
            if char != "`" and text[max(0, pos - 2):pos] == char * 2:
                column, char = column - 2, char * 3
            what = f"unclosed quote {char}: the string that starts here has no closing {char}"
        else:
            what = f"unexpected character {char!r}"
        raise ScriptSyntaxError(what, line=line, column=column, source=text) from None
    except UnexpectedToken as exc:
        start = getattr(exc.token, "start_pos", None)
        if start is not None and text[start:start + 2] == "/*":
            raise ScriptSyntaxError("unclosed comment: the /* that starts here has no closing */", line=exc.line,
                                    column=exc.column, source=text) from None
        if start is not None and "SEMI" in exc.expected:
            found = _statement_start_inside(text, start)
            if found is not None:  # a statement began on a later line of this one: its ';' is missing
                line, column, word = found
                raise ScriptSyntaxError(f"expected ';' before {word!r}: end each statement with ';'", line=line,
                                        column=column, source=text) from None
        raise ScriptSyntaxError(_unexpected(exc), line=exc.line, column=exc.column, source=text) from None
    except UnexpectedEOF:
        line = text.count("\n") + 1
        raise ScriptSyntaxError("the script ends inside a statement: finish it and end it with ';'",
                                line=line, column=len(text.splitlines()[-1] if text.splitlines() else "") + 1,
                                source=text) from None
    except UnexpectedInput as exc:  # pragma: no cover - the three above are all Lark raises for LALR
        raise ScriptSyntaxError(str(exc), line=exc.line, column=exc.column, source=text) from None
    return _statements(tree, text)


_STATEMENT_START = re.compile(r"^[ \t]*(!|(run|load|save|set|select)\b)", re.IGNORECASE | re.MULTILINE)


def _statement_start_inside(text: str, pos: int) -> tuple[int, int, str] | None:
    """(line, column, word) of a statement keyword starting a line of the statement that holds ``pos``,
    after its first line; None when there is none."""
    begin = text.rfind(";", 0, pos) + 1
    first_newline = text.find("\n", begin)
    if first_newline < 0 or first_newline >= pos:
        return None
    match = _STATEMENT_START.search(text, first_newline + 1, pos)
    if match is None:
        return None
    at = match.start(1)
    line = text.count("\n", 0, at) + 1
    return line, at - text.rfind("\n", 0, at), match.group(1)


_SECRET_VALUE = re.compile(
    r"""((?:api_?key|api_secret|secret_key|token|password)`?\s*=\s*)('{3}.*?'{3}|"[^"]*"|'[^']*'|[^\s;]+)""",
    re.IGNORECASE | re.DOTALL,
)


def redact_text(text: str) -> str:
    """Statement text safe to show: the values of secret keys (``apiKey="..."``) replaced by ``******``."""
    return _SECRET_VALUE.sub(lambda m: m.group(1) + '"******"', text)


def _unexpected(exc: Any) -> str:
    token = exc.token
    if token.type == "$END":
        return "the script ends inside a statement: finish it and end it with ';'"
    expected = sorted(exc.expected)
    if "SEMI" in expected:
        return f"expected ';' before {token.value!r}: end each statement with ';'"
    names = ", ".join(_TERMINAL_NAMES.get(name, name.lower()) for name in expected)
    return f"unexpected {token.value!r}; expected {names}"


_TERMINAL_NAMES = {
    "SEMI": "';'", "NAME": "a name", "STRING": "a quoted string", "BACKTICK": "a `path`", "NUMBER": "a number",
    "AS": "'as'", "AND": "'and'", "WHERE": "'where'", "EQUAL": "'='", "DOT": "'.'", "MODE": "a save mode",
}


def _statements(tree: Any, text: str) -> list[Statement]:
    out: list[Statement] = []
    children = tree.children
    for index, node in enumerate(children):
        if getattr(node, "type", None) == "SEMI":
            continue
        if index == len(children) - 1:  # the last statement has no ';' after it
            line, column = node.meta.end_line, node.meta.end_column
            raise ScriptSyntaxError("missing ';' at the end of the statement", line=line, column=column, source=text)
        out.append(_BUILDERS[node.data](node, text))
    return out


def _meta(node: Any, text: str) -> dict[str, Any]:
    return {"line": node.meta.line, "column": node.meta.column,
            "text": text[node.meta.start_pos:node.meta.end_pos]}


def unquote(token: Any) -> str:
    """A token's value: quotes and backticks removed, ``\\"``/``\\'``/``\\\\`` unescaped in short strings."""
    value = str(token)
    kind = getattr(token, "type", "")
    if kind == "BACKTICK":
        return value[1:-1]
    if kind == "STRING":
        if value[:3] in ("'''", '"""'):
            return value[3:-3]
        quote = value[0]
        return value[1:-1].replace("\\\\", "\0").replace("\\" + quote, quote).replace("\0", "\\")
    return value


def _where(node: Any, text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for param in node.find_data("param"):
        key_node, value = param.children
        key = ".".join(unquote(t) for t in key_node.children)
        if key in params:
            raise ScriptSyntaxError(f"the parameter {key!r} is given twice", line=param.meta.line,
                                    column=param.meta.column, source=text)
        params[key] = unquote(value)
    return params


def _tokens(node: Any) -> list[Any]:
    return [c for c in node.children if not hasattr(c, "data")]


def _subtree(node: Any, name: str) -> Any:
    return next((c for c in node.children if getattr(c, "data", None) == name), None)


def _params(node: Any, text: str) -> dict[str, str]:
    where = _subtree(node, "where")
    return _where(where, text) if where is not None else {}


def _command(node: Any, text: str) -> Command:
    for child in node.children:
        if getattr(child, "data", None) == "next_statement":
            keyword = child.children[0]
            raise ScriptSyntaxError(f"expected ';' before {str(keyword)!r}: end each statement with ';'",
                                    line=keyword.line, column=keyword.column, source=text)
    words = tuple(unquote(t) for t in _tokens(node)[1:])
    return Command(**_meta(node, text), words=words)


def _run(node: Any, text: str) -> Run:
    tokens = _tokens(node)  # RUN table AS module path [AS output]
    output = str(tokens[6]) if len(tokens) > 6 else None
    return Run(**_meta(node, text), table=str(tokens[1]), module=str(tokens[3]), path=unquote(tokens[4]),
               params=_params(node, text), output=output)


def _load(node: Any, text: str) -> Load:
    tokens = _tokens(node)  # LOAD format path AS table
    return Load(**_meta(node, text), format=str(tokens[1]).lower(), path=unquote(tokens[2]),
                params=_params(node, text), table=str(tokens[-1]))


def _save(node: Any, text: str) -> Save:
    tokens = _tokens(node)  # SAVE [MODE] table AS format path
    mode = "overwrite"
    if tokens[1].type == "MODE":
        mode = str(tokens[1]).lower()
        tokens = tokens[1:]
    return Save(**_meta(node, text), mode=mode, table=str(tokens[1]), format=str(tokens[3]).lower(),
                path=unquote(tokens[4]), params=_params(node, text))


def _set(node: Any, text: str) -> Set:
    tokens = _tokens(node)  # SET name value
    return Set(**_meta(node, text), name=str(tokens[1]), value=unquote(tokens[2]), params=_params(node, text))


def _select(node: Any, text: str) -> Select:
    tokens = _tokens(node)
    meta = _meta(node, text)
    if len(tokens) < 4 or str(tokens[-2]).lower() != "as" or tokens[-1].type != "NAME":
        last = tokens[-1]
        raise ScriptSyntaxError(
            "a select statement ends with 'as <table>' (Byzer-LLM's form: select ... as t;), which registers "
            "its result as the temporary view <table>",
            line=last.end_line, column=last.end_column, source=text,
        )
    body = tokens[:-2]
    for index in range(2, len(body)):
        token, name, as_ = body[index], body[index - 1], body[index - 2]
        if (str(token).lower() == "select" and token.column == 1 and str(as_).lower() == "as"
                and name.type == "NAME" and name.line < token.line):
            raise ScriptSyntaxError(f"missing ';' after 'as {name}': a new select starts on line {token.line}",
                                    line=name.end_line, column=name.end_column, source=text)
    fixes: list[str] = []
    pieces: list[str] = []
    cursor = body[0].start_pos
    for index, token in enumerate(body):
        pieces.append(text[cursor:token.start_pos])
        value = str(token)
        if token.type == "PUNCT" and value in _FULL_WIDTH:
            fixes.append(f"read the full-width {value!r} at column {token.column} as {_FULL_WIDTH[value]!r}")
            value = _FULL_WIDTH[value]
        following = body[index + 1] if index + 1 < len(body) else None
        if value == "," and following is not None and str(following) in (")", "）"):
            fixes.append(f"dropped the trailing ',' at column {token.column} before ')'")
            value = ""
        pieces.append(value)
        cursor = token.end_pos
    return Select(**meta, sql="".join(pieces), table=str(tokens[-1]), fixes=tuple(fixes))


def _other(node: Any, text: str) -> Other:
    return Other(**_meta(node, text), word=str(_tokens(node)[0]))


_BUILDERS = {"command": _command, "run": _run, "load": _load, "save": _save, "set": _set, "select": _select,
             "other": _other}
