"""``ModelTable``: a handle on one model table, in the style of delta's ``DeltaTable``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from . import history as _history
from . import reader as _reader
from . import spark as _spark
from . import writer as _writer
from ._format import DEFAULT_CHUNK_SIZE
from ._open import exists, open_snapshot
from .names import TableRef, locate_name, locate_path

__all__ = ["ModelTable"]


class ModelTable:
    """A model table, found by path (:meth:`for_path`) or by name (:meth:`for_name`).

    The handle holds only the location; every method reads the table's log afresh, so a handle
    sees versions that other processes commit. Methods mirror the module functions
    (``save_model_table``, ``load_model_table``, ``model_table_history``,
    ``read_model_table``) and raise what they raise.

    Example:
        >>> import pathlib, tempfile
        >>> work = pathlib.Path(tempfile.mkdtemp())
        >>> (work / "model").mkdir(); (work / "model" / "config.json").write_text("{}")
        2
        >>> t = ModelTable.for_path(work / "table")
        >>> t.exists()
        False
        >>> t.save(work / "model", metadata={"base": "SmolLM2-135M"})
        0
        >>> t.version, [h["metadata"] for h in t.history()]
        (0, [{'base': 'SmolLM2-135M'}])
        >>> sorted(os.listdir(t.load(cache_dir=work / "cache")))
        ['config.json']
    """

    __slots__ = ("_ref",)

    def __init__(self, ref: TableRef) -> None:
        self._ref = ref

    @classmethod
    def for_path(cls, path: str | os.PathLike[str]) -> ModelTable:
        """The table at a directory path or URI (``"/data/t"``, ``"s3://b/t"``); never a name.

        Raises ConfigError when ``path`` is empty or not a string/path.
        """
        return cls(locate_path(path))

    @classmethod
    def for_name(
        cls, name: str, warehouse: str | os.PathLike[str] | None = None
    ) -> ModelTable:
        """The table ``db.name`` (or ``` `db`.`name` ```, ``` `db.name` ```) in the warehouse.

        ``warehouse`` defaults to ``$BYZERLLM_WAREHOUSE``, else ``~/.byzerllm_spark/warehouse``.
        Raises ConfigError when ``name`` is not a ``db.name`` table name.
        """
        return cls(locate_name(name, warehouse))

    @property
    def uri(self) -> str:
        """Where the table lives (str): an absolute local path or a URI."""
        return self._ref.uri

    @property
    def version(self) -> int:
        """The latest version (int), read from the log; ModelNotFoundError if there is no table."""
        return open_snapshot(self._ref).version

    def exists(self) -> bool:
        """Whether a model table is there (see ``is_model_table``)."""
        return exists(self._ref)

    def save(
        self,
        model_dir: str | os.PathLike[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        mode: str = "overwrite",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> int:
        """Save ``model_dir`` as a new version; return it (see ``save_model_table``)."""
        return _writer.save(
            self._ref, model_dir, metadata=metadata, mode=mode, chunk_size=chunk_size
        )

    def load(
        self, version: int | None = None, cache_dir: str | os.PathLike[str] | None = None
    ) -> str:
        """A verified local copy of ``version`` (latest when None); see ``load_model_table``."""
        return _reader.load(self._ref, version=version, cache_dir=cache_dir)

    def history(self) -> list[dict[str, Any]]:
        """One dict per version, newest first (see ``model_table_history``)."""
        return _history.history(self._ref)

    def to_spark(self, spark, version: int | None = None):
        """The chunk rows of ``version`` as a Spark DataFrame (see ``read_model_table``)."""
        return _spark.to_spark(self._ref, spark, version=version)

    def __repr__(self) -> str:
        return f"ModelTable({self._ref.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelTable) and other._ref.uri == self._ref.uri

    def __hash__(self) -> int:
        return hash(self._ref.uri)
