"""Model tables: a model directory kept as a Delta Lake table of checksummed binary chunks.

Byzer-LLM treats models as tables (``load model.`...` as t``, ``save overwrite t as
delta.`ai_model.llama2_300```). Here a model directory becomes a Delta table with one row per
chunk of each file (the columns are in ``_format``); each save is one Delta commit, so an
overwrite makes a new version, older versions stay readable (time travel), and a save killed
halfway leaves only unreferenced files behind.

Modules, lower to higher (each imports only those before it, plus ``..errors`` and
``..settings``): ``_format`` (columns, sizes), ``names`` (names, paths, URIs), ``_open`` (opening
a version; delta-rs errors turned into ours), ``writer`` (save), ``reader`` (load and the node
cache), ``history``, ``spark`` (read from Spark), ``table`` (the ``ModelTable`` handle).

Importing this package is cheap: deltalake and pyarrow are imported inside the functions.
"""

from __future__ import annotations

from ._format import DEFAULT_CHUNK_SIZE
from ._open import is_model_table
from .history import model_table_history
from .names import resolve_table_uri
from .reader import load_model_table
from .spark import read_model_table
from .table import ModelTable
from .writer import save_model_table

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ModelTable",
    "is_model_table",
    "load_model_table",
    "model_table_history",
    "read_model_table",
    "resolve_table_uri",
    "save_model_table",
]
