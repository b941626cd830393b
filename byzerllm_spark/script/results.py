"""What a script did: one :class:`StatementResult` per statement, gathered in a :class:`ScriptResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import parser as p


@dataclass
class StatementResult:
    """What one statement did.

    Attributes:
        statement: the parsed statement (its ``line`` and ``text``).
        summary: one line saying what was done.
        value: the statement's product: a DataFrame (load/select), DeployConfig, FinetuneJob, the conf
            dict (``!byzerllm setup;``), a model path or table version.
        table: the temporary view or model name the statement registered, if any.
        warnings: what the statement accepted but could not honour, and lenient readings.
        seconds: wall time.
    """

    statement: p.Statement
    summary: str
    value: Any = None
    table: str | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __repr__(self) -> str:
        return f"<line {self.statement.line}: {self.summary}>"


class ScriptResult(list):
    """The :class:`StatementResult` of each statement run, in order (a list), with helpers.

    Example:
        >>> result = bls.run_script("select 1 as x as t;", spark=spark)  # doctest: +SKIP
        >>> result.tables["t"].collect()  # doctest: +SKIP
        [Row(x=1)]
    """

    @property
    def tables(self) -> dict[str, Any]:
        """Temporary views registered by the script: name → DataFrame."""
        return {r.table: r.value for r in self if r.table and is_dataframe(r.value)}

    @property
    def last(self) -> StatementResult | None:
        return self[-1] if self else None

    def __repr__(self) -> str:
        return "\n".join(f"[{i}] line {r.statement.line}: {r.summary}" for i, r in enumerate(self)) or "<no statements>"


def is_dataframe(value: Any) -> bool:
    return type(value).__name__ == "DataFrame"


